"""Results a user can look at: accuracy against rounds, uploaded megabytes and compute."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "plot_runs"]


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = ""
) -> Path:
    """Three panels, one line per run: accuracy by round, by cumulative upload (MB) and by
    cumulative compute: the seconds every client reported, summed, plus the server's (ours
    trains the global model there; a baseline's server only averages). Where every
    trained round is above 0.5 accuracy, the axis starts just below them (the label says
    so), leaving the initial model's point off the chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (by_round, by_bytes, by_compute) = plt.subplots(1, 3, figsize=(15, 3.8))
    for label, rows in runs.items():
        spent, compute = 0.0, []
        for r in rows:
            spent += (r.get("client_seconds_sum") or 0.0) + (r.get("server_seconds") or 0.0)
            compute.append(spent / 60)
        kept = [(r, c) for r, c in zip(rows, compute, strict=True) if r.get("accuracy") is not None]
        acc = [r["accuracy"] for r, _ in kept]
        by_round.plot([r["round"] for r, _ in kept], acc, marker="o", label=label)
        by_bytes.plot(
            [r["upload_bytes_total"] / 1e6 for r, _ in kept], acc, marker="o", label=label
        )
        by_compute.plot([c for _, c in kept], acc, marker="o", label=label)
    ylabel = "test accuracy (global model)"
    trained = [
        r["accuracy"]
        for rows in runs.values()
        for r in rows
        if r["round"] > 0 and r.get("accuracy") is not None
    ]
    if trained and min(trained) > 0.5:
        # The initial model's chance-level row would flatten what tells runs apart (tenths of
        # a point near the top) into one line: the axis starts just below the trained rounds.
        low = math.floor((min(trained) - 0.005) * 100) / 100
        ylabel = f"test accuracy, global model (axis from {low:.2f})"
        for ax in (by_round, by_bytes, by_compute):
            ax.set_ylim(low, min(1.0, max(trained) + 0.005))
    by_round.set_xlabel("round")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 2.5
    by_bytes.set_xlabel("cumulative upload (MB, all clients)")
    by_compute.set_xlabel("cumulative compute (minutes, clients summed + server)")
    for ax in (by_round, by_bytes, by_compute):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A text table: per run and round, accuracy, MB up (round and total) and down, client
    seconds (the slowest client's and all clients' sum), server seconds and epsilon."""
    lines = [
        f"{'run':<12}{'round':>6}{'accuracy':>10}{'MB up':>9}{'MB total':>10}{'MB down':>9}"
        f"{'client s max':>13}{'client s sum':>13}{'server s':>9}{'eps max':>9}"
    ]
    for label, rows in runs.items():
        for r in rows:
            acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
            lines.append(
                f"{label:<12}{r['round']:>6}{acc:>10}{r['upload_bytes'] / 1e6:>9.3f}"
                f"{r['upload_bytes_total'] / 1e6:>10.3f}{r.get('download_bytes', 0) / 1e6:>9.3f}"
                f"{r.get('client_seconds_max', 0.0):>13.1f}{r.get('client_seconds_sum', 0.0):>13.1f}"
                f"{r.get('server_seconds', 0.0):>9.1f}{r.get('epsilon_max', 0.0):>9.3f}"
            )
    return "\n".join(lines)
