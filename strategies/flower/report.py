"""Results a user can look at: accuracy against rounds and against uploaded megabytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "plot_runs"]


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = ""
) -> Path:
    """Two panels, one line per run: accuracy by round, and by cumulative upload (MB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in runs.items():
        rows = [r for r in rows if r.get("accuracy") is not None]
        acc = [r["accuracy"] for r in rows]
        by_round.plot([r["round"] for r in rows], acc, marker="o", label=label)
        by_bytes.plot([r["upload_bytes_total"] / 1e6 for r in rows], acc, marker="o", label=label)
    by_round.set_xlabel("round")
    by_bytes.set_xlabel("cumulative upload (MB, all clients)")
    for ax in (by_round, by_bytes):
        ax.set_ylabel("test accuracy (global model)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A text table: per run and round, accuracy, uploaded MB and epsilon."""
    lines = [
        f"{'run':<12}{'round':>6}{'accuracy':>10}{'MB round':>10}{'MB total':>10}{'eps max':>9}"
    ]
    for label, rows in runs.items():
        for r in rows:
            acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
            lines.append(
                f"{label:<12}{r['round']:>6}{acc:>10}{r['upload_bytes'] / 1e6:>10.3f}"
                f"{r['upload_bytes_total'] / 1e6:>10.3f}{r.get('epsilon_max', 0.0):>9.3f}"
            )
    return "\n".join(lines)
