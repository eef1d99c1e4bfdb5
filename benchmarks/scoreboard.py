"""Every named target the open issues set, against what the committed results measured.

Reads the ``"targets"`` list of every JSON under ``benchmarks/results/`` and prints one
table: per issue target, each measurement of it (file, value, whether it meets the issue's
goal, when the file was last committed), and the targets nothing has measured yet. A row
whose file states another goal than the issue is flagged (and judged by the issue's), so
that a script cannot quietly move a goal. Writes the same table as Markdown with ``--markdown``.

    python benchmarks/scoreboard.py
    python benchmarks/scoreboard.py --markdown benchmarks/results/scoreboard.md
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

RESULTS = Path(__file__).parent / "results"

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


class Goal(NamedTuple):
    """A target as its issue states it."""

    issue: int
    op: str
    value: float


# The names, comparisons and values the issues ask for (``issues show N``, section Targets).
ISSUE_TARGETS: dict[str, Goal] = {
    "mnist-ipc10-15min-acc": Goal(10, ">=", 0.98),
    "cifar10-ipc10-60min-acc": Goal(10, ">=", 0.60),
    "cifar10-ipc1-60min-gain-over-dm": Goal(10, ">", 0.0),
    "cifar10-ipc50-60min-gain-over-dm": Goal(10, ">", 0.0),
    "dm-mnist-64-floor-ratio": Goal(11, "<=", 1.15),
    "dm-mnist-256-floor-ratio": Goal(11, "<=", 1.15),
    "dm-bf16-speedup": Goal(11, ">=", 1.8),
    "eval-floor-ratio": Goal(11, "<=", 1.15),
    "eval-bf16-speedup": Goal(11, ">=", 2.0),
    "suite-minutes": Goal(11, "<", 10.0),
    "h200-dm256-ms": Goal(11, "<=", 20.0),
    "h200-eval-s": Goal(11, "<=", 10.0),
    "mnist-dir0.1-rounds-to-baseline": Goal(12, "<=", 5),
    "mnist-dir0.5-rounds-to-baseline": Goal(12, "<=", 5),
    "cifar10-dir0.5-rounds-to-baseline": Goal(12, "<=", 5),
    "mnist-dir0.1-bytes-ratio": Goal(12, "<=", 0.25),
    "mnist-dir0.5-bytes-ratio": Goal(12, "<=", 0.25),
    "cifar10-dir0.5-bytes-ratio": Goal(12, "<=", 0.25),
    "dp-eps8-acc-minus-dpsgd": Goal(12, ">=", 0.0),
    "clients100-peak-gb": Goal(12, "<", 12.0),
    "poison-2of10-acc-drop": Goal(12, "<=", 0.01),
    "split-mnist-100img-acc": Goal(13, ">=", 0.95),
    "split-cifar10-200img-gain": Goal(13, ">=", 0.10),
    "split-cifar10-1000img-gain": Goal(13, ">=", 0.05),
    "memory-build-over-train-max": Goal(13, "<=", 1.0),
}
# Reported, with no value to meet.
REPORTED = {"demo-baseline-acc": 12}


class Row(NamedTuple):
    """One measurement of a target in one results file."""

    name: str
    file: str
    value: float | None
    target: float
    op: str
    unit: str
    committed: str
    machine: str = "not recorded"

    def meets(self, goal: Goal) -> bool:
        """The value (None: never reached) satisfies the issue's comparison, whatever the
        file states."""
        return self.value is not None and OPS[goal.op](self.value, goal.value)

    def departs_from(self, goal: Goal) -> bool:
        """The file states another comparison or value than the issue does."""
        return self.op != goal.op or abs(self.target - goal.value) > 1e-12


def committed(path: Path) -> str:
    """The date of the last commit that touched ``path`` ("uncommitted" if none)."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", path.name],
            cwd=path.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    return out or "uncommitted"


def machine_of(data: dict[str, Any]) -> str:
    """Where a results file was measured: its ``machine`` (:mod:`machine`), else its rows'
    (a table run over sittings), each as CPU, cores and whether bfloat16 was native."""
    found = [data.get("machine")] + [
        r.get("machine") for r in data.get("rows") or [] if isinstance(r, dict)
    ]
    named = {
        f"{m['cpu']} ×{m['cores']}"
        + (", native bf16" if m.get("native_bf16_cpu") else "")
        + (f", {m['gpu']}" if m.get("gpu") else "")
        for m in found
        if isinstance(m, dict)
    }
    return " + ".join(sorted(named)) or "not recorded"


def measurements(root: Path) -> Iterator[Row]:
    """Every row of every ``targets`` list in the JSON files under ``root``."""
    for path in sorted(root.rglob("*.json")):
        try:
            data: Any = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        targets = data.get("targets") if isinstance(data, dict) else None
        if not targets:
            continue
        when, where = committed(path), machine_of(data)
        for t in targets:
            yield Row(
                t["name"],
                str(path.relative_to(root)),
                t["value"],
                float(t["target"]),
                t["op"],
                t.get("unit", ""),
                when,
                where,
            )


def table(rows: list[Row]) -> list[str]:
    """Markdown lines: the issues' targets in issue order, each measurement of each, then
    the ones not measured."""
    by_name: dict[str, list[Row]] = {}
    for r in rows:
        by_name.setdefault(r.name, []).append(r)
    lines = [
        "| issue | target | goal | measured | met | file | committed | machine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    missing = []
    names = sorted({**ISSUE_TARGETS, **REPORTED}, key=lambda n: _issue_of(n))
    for name in names:
        goal = ISSUE_TARGETS.get(name)
        stated = f"{goal.op} {goal.value:g}" if goal else "report"
        found = by_name.get(name, [])
        if not found:
            missing.append(f"{_issue_of(name)}: `{name}` ({stated})")
            continue
        for r in sorted(found, key=lambda r: r.committed, reverse=True):
            value = "not reached" if r.value is None else f"{r.value:.4g} {r.unit}".strip()
            if goal is None:
                met = "–"
            else:
                met = "yes" if r.meets(goal) else "no"
                if r.departs_from(goal):
                    met += f" (file says {r.op} {r.target:g})"
            lines.append(
                f"| {_issue_of(name)} | `{name}` | {stated} | {value} | {met} | {r.file} | {r.committed} | {r.machine} |"
            )
    if missing:
        lines += ["", "Not measured yet:", ""] + [f"- issue {m}" for m in missing]
    return lines


def _issue_of(name: str) -> int:
    goal = ISSUE_TARGETS.get(name)
    return goal.issue if goal else REPORTED[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of results JSON")
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args()
    lines = table(list(measurements(Path(args.results))))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
