"""Deployment on loopback: a real SuperLink, real SuperNodes, ``flwr run`` against them.

One SuperNode is killed (SIGKILL, whole process group) while its ClientApp is distilling;
the run must still complete: the survivor's upload is accepted, the lost node is reported
as failed with a reason, and the global model is trained on the survivor's set.

Everything runs on 127.0.0.1 with ports chosen at run time and a temporary ``FLWR_HOME``;
every process this module starts (and everything they spawn: SuperExecs, ServerApp,
ClientApps) is killed when the fixture's :class:`~fedcl_dd.strategies.flower.loopback.Loopback`
closes, even when a test fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from fedcl_dd.strategies.flower.loopback import BIN, Loopback, alive, free_port, tagged

pytest.importorskip("flwr")
pytest.importorskip("sklearn")  # the digits dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("flower"),
]  # Flower/Ray tests share one xdist worker

REPO = Path(__file__).resolve().parents[1]
NODE_ID = re.compile(r"SuperNode ID: (\d+)")
RUN_ID = re.compile(r"Successfully started run (\d+)")


@pytest.fixture
def deployment(tmp_path: Path):
    with Loopback(tmp_path) as dep:
        yield dep


# ------------------------------------------------------------------------------- tests
def test_run_survives_a_supernode_killed_while_distilling(
    deployment: Loopback, tmp_path: Path
) -> None:
    started = time.monotonic()
    out_dir = tmp_path / "out"  # absolute: the ServerApp runs in the SuperLink's working directory
    # Everything starts at once (SuperNodes retry until the SuperLink is up; the ServerApp
    # waits for both nodes): process start-up is most of this test's time.
    link = deployment.superlink()
    victim, survivor = deployment.supernode(0, 2), deployment.supernode(1, 2)
    deployment.wait_ready(link)
    run_config = (
        f"preset='digits-iid-2' rounds=1 iterations=40 real-per-class=32 server-epochs=20 fraction-evaluate=0.0 "
        f"out-dir='{out_dir}'"
    )
    # --stream: `flwr run` prints the ServerApp's logs and returns when the run has ended.
    run = deployment.flwr_run(REPO, run_config)
    try:
        victim_id = int(victim.wait_for(NODE_ID, timeout=60).group(1))
        survivor_id = int(survivor.wait_for(NODE_ID, timeout=60).group(1))
        run_id = run.wait_for(RUN_ID, timeout=60).group(1)
        # The victim has the train message and has started its ClientApp: kill the whole node.
        victim.wait_for(
            re.compile(r"Receiving: train message[\s\S]*Start `flwr-clientapp` process"), timeout=90
        )
        time.sleep(2)
        assert victim.popen.poll() is None, "the victim SuperNode ended on its own"
        victim.kill()
        # The survivor's reply comes in; the victim's message fails once the SuperLink misses
        # its heartbeats (2 x 30 s) and the evaluate round uses the survivor only.
        run.popen.wait(timeout=200)
    except (subprocess.TimeoutExpired, TimeoutError) as exc:
        pytest.fail(f"the run did not complete: {exc}\n{deployment.dump_logs()}")
    log = run.text()

    status = json.loads(
        deployment.flwr(
            "list", deployment.connection, "--run-id", run_id, "--format", "json", timeout=60
        ).stdout
    )
    assert status["runs"][0]["status"] == "finished:completed", f"{status}\n{log[-4000:]}"
    results_file = out_dir / "results.json"
    assert results_file.is_file(), f"no {results_file}; ServerApp log:\n{log[-4000:]}"
    rounds = {row["round"]: row for row in json.loads(results_file.read_text())["rounds"]}
    assert set(rounds) == {0, 1}, rounds
    r1 = rounds[1]
    assert r1["accepted"] == [1], r1  # the survivor's partition
    assert r1["rejected"] == [], r1
    assert len(r1["failed"]) == 1, r1
    failure = r1["failed"][0]
    assert failure["node"] == victim_id != survivor_id, (failure, victim_id, survivor_id)
    assert failure["reason"].strip(), failure
    assert not r1["kept_previous_model"] and r1["upload_bytes"] > 0 and r1["pool_images"] > 0, r1
    assert r1["accuracy"] is not None and r1["accuracy"] != rounds[0]["accuracy"], (rounds[0], r1)
    print(f"deployment run: {time.monotonic() - started:.0f} s; failure: {failure['reason']}")


def test_flwr_run_dot_simulates_with_the_local_superlink(
    deployment: Loopback, tmp_path: Path
) -> None:
    """``flwr run . --stream`` from the project root with the default ``local`` connection:
    Flower starts a local SuperLink (simulation runtime, Ray), runs our apps on 2 simulated
    SuperNodes and leaves that SuperLink running; the fixture stops it."""
    started = time.monotonic()
    out_dir = tmp_path / "out"
    # Our own ports for the local SuperLink (defaults 39091 / 39093) and a fresh FLWR_HOME, whose
    # default config.toml (created by `flwr`) has the `local` connection.
    http_port, control_port = free_port(), free_port()
    deployment.env.update(
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
    )
    args = [
        str(BIN / "flwr"),
        "run",
        ".",
        "--stream",
        "--federation-config",
        "num-supernodes=2",
        "--run-config",
        f"preset='digits-iid-2' rounds=1 iterations=20 server-epochs=20 fraction-evaluate=0.0 out-dir='{out_dir}'",
    ]
    run = subprocess.run(
        args, env=deployment.env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert f"Starting local SuperLink on 127.0.0.1:{http_port}" in log, log[-4000:]
    links = [
        pid
        for pid in tagged("FLWR_HOME", str(deployment.home))
        if b"flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes() and alive(pid)
    ]
    assert links, "the local SuperLink should still be running after the run"

    rounds = {
        row["round"]: row for row in json.loads((out_dir / "results.json").read_text())["rounds"]
    }
    assert sorted(rounds[1]["accepted"]) == [0, 1] and rounds[1]["failed"] == [], rounds[1]
    assert rounds[1]["accuracy"] > rounds[0]["accuracy"] + 0.2, rounds
    print(f"flwr run . (simulation): {time.monotonic() - started:.0f} s")
