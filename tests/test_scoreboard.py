"""benchmarks/scoreboard.py: the issues' targets read back from results JSON."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_scripts import BENCHMARKS, load_script


@pytest.fixture(scope="module")
def board() -> ModuleType:
    return load_script("scoreboard")


def _write(path: Path, targets: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": [], "targets": targets}))


def _t(name: str, value: float | None, target: float, op: str) -> dict:
    return {"name": name, "value": value, "target": target, "op": op, "unit": "", "command": "x"}


def _row(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if f"`{name}` |" in line]


def test_met_missed_unreached_moved_and_missing_targets_are_told_apart(board, tmp_path):
    _write(
        tmp_path / "a.json",
        [
            _t("suite-minutes", 8.2, 10, "<"),  # met
            _t("eval-floor-ratio", 2.3, 1.15, "<="),  # missed
            _t("mnist-dir0.5-rounds-to-baseline", None, 5, "<="),  # never reached the baseline
            _t("dm-bf16-speedup", 1.5, 1.2, ">="),  # the file moved the goal
            _t("something-else", 1.0, 0.0, ">"),  # not an issue target: not listed
        ],
    )
    _write(tmp_path / "sub" / "broken.json", [])
    (tmp_path / "sub" / "not-json.json").write_text("{")
    lines = board.table(list(board.measurements(tmp_path)))

    assert "| yes |" in _row(lines, "suite-minutes")[0]
    assert "| no |" in _row(lines, "eval-floor-ratio")[0]
    unreached = _row(lines, "mnist-dir0.5-rounds-to-baseline")[0]
    assert "not reached" in unreached and "| no |" in unreached
    assert "no (file says >= 1.2)" in _row(lines, "dm-bf16-speedup")[0]
    assert not any("something-else" in line for line in lines)
    missing = lines[lines.index("Not measured yet:") :]
    assert any("`cifar10-ipc10-60min-acc`" in line for line in missing)
    assert not any("`suite-minutes`" in line for line in missing)


def test_every_committed_results_file_names_issue_targets_as_the_issues_do(board):
    rows = [r for r in board.measurements(BENCHMARKS / "results") if r.name in board.ISSUE_TARGETS]
    assert rows, "the committed results measure at least one issue target"
    moved = [r for r in rows if r.departs_from(board.ISSUE_TARGETS[r.name])]
    assert not moved, f"results state other goals than their issues: {moved}"


def test_each_measurement_says_the_machine_it_ran_on(board, tmp_path):
    """The file's machine, else its rows' (a table run over sittings, each machine once),
    else "not recorded"; a CPU without native bfloat16 is not said to have it."""
    epyc = {"cpu": "AMD EPYC", "cores": 2, "native_bf16_cpu": False, "gpu": None}
    xeon = {"cpu": "Intel Xeon", "cores": 2, "native_bf16_cpu": True, "gpu": None}
    targets = [_t("suite-minutes", 8.2, 10, "<")]
    (tmp_path / "top.json").write_text(json.dumps({"machine": epyc, "targets": targets}))
    rows = [{"machine": xeon}, {"machine": epyc}, {"machine": epyc}]
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows, "targets": targets}))
    _write(tmp_path / "old.json", targets)
    where = {r.file: r.machine for r in board.measurements(tmp_path)}
    assert where == {
        "top.json": "AMD EPYC ×2",
        "rows.json": "AMD EPYC ×2 + Intel Xeon ×2, native bf16",
        "old.json": "not recorded",
    }
    assert any(
        line.endswith("| AMD EPYC ×2 |") for line in board.table(list(board.measurements(tmp_path)))
    )
