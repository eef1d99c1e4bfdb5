"""Checkpoint and resume: kill the server mid-run, resume, and end as an uninterrupted run would.

``fedcl-dd simulate`` runs as a real process (Ray backend) and is killed once its checkpoint
shows round 2 of 4; ``--resume`` continues after the last completed round. The private
clients' ledgers must equal what Opacus's accountant gives for four uninterrupted rounds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.strategy import CheckpointMismatch, SyntheticSetStrategy
from opacus.accountants import RDPAccountant

from fedcl_dd.io import CorruptCheckpoint, load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]

ARGS = [
    "--preset",
    "digits-iid-3",
    "--rounds",
    "4",
    "--method",
    "dm-dp",
    "--epsilon",
    "8",
    "--ipc",
    "2",
    "--iterations",
    "5",
    "--server-epochs",
    "5",
    "--set",
    "real-per-class=32",
]


def _simulate(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedcl_dd.cli", "simulate", *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _completed_round(checkpoint: Path) -> int:
    try:
        return int(load_checkpoint(checkpoint)["round"])
    except (FileNotFoundError, CorruptCheckpoint):
        return 0


def test_kill_after_round_two_then_resume(tmp_path):
    out = tmp_path / "run"
    proc = _simulate(out)
    try:
        deadline = time.monotonic() + 300
        while _completed_round(out / "checkpoint.pt") < 2:
            assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint of round 2 within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its Ray workers, mid-round
        proc.wait()
    killed_at = _completed_round(out / "checkpoint.pt")
    assert 2 <= killed_at < 4, "the kill came too late to test resuming"

    resumed = _simulate(out, "--resume")
    log, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, log[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_after"] == killed_at
    first = results["rounds"][0]  # the initial model's accuracy survives the restart
    assert first["round"] == 0 and 0.0 < first["accuracy"] <= 1.0, first
    rows = [row for row in results["rounds"] if row["round"] > 0]
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    # A client that finished the interrupted round before the kill keeps that release in its
    # ledger (written before its reply left): the redone round spends its last planned
    # releases, and it refuses the next round rather than overspend. The others take part in
    # every round. Which clients finish first is a race, so both cases are checked.
    for row in rows:
        assert row["rejected"] == []
        assert len(row["accepted"]) + len(row["failed"]) == 3, row
        assert all("is spent" in f["reason"] for f in row["failed"]), row["failed"]
        if row["round"] <= killed_at + 1:
            assert row["accepted"] == [0, 1, 2]
    accepted_rounds = {pid: sum(pid in row["accepted"] for row in rows) for pid in range(3)}
    # Each round's validation accuracy was checkpointed with it, the rounds before the kill too;
    # only the round the kill interrupted (its model checkpointed, its evaluation not yet run)
    # may lack one.
    validation = {row["round"]: row["validation_accuracy"] for row in rows}
    assert all(0.0 < validation[r] <= 1.0 for r in (1, 2, 3, 4) if r != killed_at), validation

    # Every client released exactly what the run planned, 4 rounds x 5 at its (sigma, q), as
    # its own ledger says; the server booked the releases it received, and its epsilon for
    # a client that took part in every round is that of an uninterrupted run.
    state = load_checkpoint(out / "checkpoint.pt")
    cfg = FedConfig.from_mapping(state["config"])
    for pid in range(3):
        own = json.loads((out / "client-state" / f"partition-{pid}" / "ledger.json").read_text())
        assert sum(own["steps"]) == 4 * cfg.iterations
        history = state["ledgers"][pid]
        sigma, q = history["noise_multipliers"][0], history["sample_rates"][0]
        assert sum(history["steps"]) == accepted_rounds[pid] * cfg.iterations
        accountant = RDPAccountant()
        accountant.history = [(sigma, q, sum(history["steps"]))]
        expected = accountant.get_epsilon(cfg.delta)
        final = results["rounds"][-1]["epsilon"][str(pid)]
        assert final == pytest.approx(expected, rel=1e-9)
        assert final <= cfg.epsilon * (1 + 1e-6)

    # Resuming with other settings is refused, naming what differs.
    other = SyntheticSetStrategy(cfg.replace(ipc=4), checkpoint=out / "checkpoint.pt")
    with pytest.raises(CheckpointMismatch, match="ipc: 2 vs 4"):
        other.resume()
