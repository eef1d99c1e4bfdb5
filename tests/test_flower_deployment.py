"""Deployment on loopback: a real SuperLink, real SuperNodes, ``flwr run`` against them.

One SuperNode is killed (SIGKILL, whole process group) while its ClientApp is distilling;
the run must still complete: the survivor's upload is accepted, the lost node is reported
as failed with a reason, and the global model is trained on the survivor's set.

Everything runs on 127.0.0.1 with ports chosen at run time and a temporary ``FLWR_HOME``;
every process this module starts (and everything they spawn: SuperExecs, ServerApp,
ClientApps) is killed in the fixtures' ``finally`` blocks, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("sklearn")  # the digits dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("flower"),
]  # Flower/Ray tests share one xdist worker

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUPERLINK_READY = "Uvicorn running on"
NODE_ID = re.compile(r"SuperNode ID: (\d+)")
RUN_ID = re.compile(r"Successfully started run (\d+)")


# --------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _tagged(var: str, value: str) -> list[int]:
    """Pids of the processes whose environment has ``var=value`` (what this module started,
    and everything they spawned: the local SuperLink and Ray detach into their own sessions)."""
    tag, pids = f"{var}={value}".encode() + b"\0", []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if tag in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _kill_all(pids: list[int]) -> list[int]:
    """SIGKILL ``pids``, their descendants and their process groups; wait until they are gone."""
    pids = sorted({*pids, *(d for pid in pids for d in _descendants(pid))})
    groups = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for pgid in groups - {os.getpgid(0)}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Proc:
    """A process started in its own session, its output in a log file."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], logdir: Path, cwd: Path
    ) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                args,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match:
        """Wait until the log matches ``pattern``; fail with the log's tail otherwise."""
        regex = (
            re.compile(pattern)
            if isinstance(pattern, re.Pattern)
            else re.compile(re.escape(pattern))
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := regex.search(self.text()):
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.3)
        pytest.fail(
            f"{self.name}: no {regex.pattern!r} within {timeout:.0f} s "
            f"(exit code {self.popen.poll()}); log tail:\n{self.text()[-3000:]}"
        )

    def kill(self) -> list[int]:
        """SIGKILL the process, its process group and every descendant; return the pids hit."""
        pids = _kill_all([self.popen.pid])
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        return pids


class Deployment:
    """A SuperLink and SuperNodes on loopback, plus a Flower config with a connection to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.home = root / "flwr-home"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink spawns flower-superexec
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.procs: list[Proc] = []
        self.port = 0
        self.connection = "loopback"

    def start(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.env, self.logs, cwd=self.root)
        self.procs.append(proc)
        return proc

    def superlink(self) -> Proc:
        self.port = _free_port()
        return self.start(
            "superlink", [str(BIN / "flower-superlink"), "--insecure", "--port", str(self.port)]
        )

    def wait_ready(self, link: Proc) -> None:
        """Wait for the SuperLink; write the Flower config with a connection to it."""
        link.wait_for(SUPERLINK_READY, timeout=60)
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
            f'[superlink.{self.connection}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def supernode(self, partition: int, partitions: int) -> Proc:
        return self.start(
            f"supernode{partition}",
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--node-config",
                f"partition-id={partition} num-partitions={partitions}",
                "--port",
                str(_free_port()),
            ],
        )

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        pids: list[int] = []
        for proc in reversed(self.procs):  # nodes first, then the SuperLink
            pids += proc.kill()
        pids += _kill_all(_tagged("FLWR_HOME", str(self.home)))  # detached ones (SuperExec, Ray)
        deadline = time.monotonic() + 10
        while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes survived the teardown: {left}"

    def dump_logs(self) -> str:
        return "\n".join(f"----- {p.name}\n{p.text()[-2500:]}" for p in self.procs)


@pytest.fixture
def deployment(tmp_path: Path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


# ------------------------------------------------------------------------------- tests
def test_run_survives_a_supernode_killed_while_distilling(
    deployment: Deployment, tmp_path: Path
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
    run = deployment.start(
        "flwr-run",
        [
            str(BIN / "flwr"),
            "run",
            str(REPO),
            deployment.connection,
            "--run-config",
            run_config,
            "--stream",
        ],
    )
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
    except (subprocess.TimeoutExpired, pytest.fail.Exception) as exc:
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
    deployment: Deployment, tmp_path: Path
) -> None:
    """``flwr run . --stream`` from the project root with the default ``local`` connection:
    Flower starts a local SuperLink (simulation runtime, Ray), runs our apps on 2 simulated
    SuperNodes and leaves that SuperLink running; the fixture stops it."""
    started = time.monotonic()
    out_dir = tmp_path / "out"
    # Our own ports for the local SuperLink (defaults 39091 / 39093) and a fresh FLWR_HOME, whose
    # default config.toml (created by `flwr`) has the `local` connection.
    http_port, control_port = _free_port(), _free_port()
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
        for pid in _tagged("FLWR_HOME", str(deployment.home))
        if b"flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid)
    ]
    assert links, "the local SuperLink should still be running after the run"

    rounds = {
        row["round"]: row for row in json.loads((out_dir / "results.json").read_text())["rounds"]
    }
    assert sorted(rounds[1]["accepted"]) == [0, 1] and rounds[1]["failed"] == [], rounds[1]
    assert rounds[1]["accuracy"] > rounds[0]["accuracy"] + 0.2, rounds
    print(f"flwr run . (simulation): {time.monotonic() - started:.0f} s")
