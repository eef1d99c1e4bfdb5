"""A Flower deployment on one machine: a real SuperLink and SuperNodes on 127.0.0.1.

What ``docs/deployment.md`` does by hand, as one object: ports chosen at run time, a
``FLWR_HOME`` of its own (with a ``loopback`` connection to the SuperLink for ``flwr``), each
process in its own session with its output in a log file, and :meth:`Loopback.stop` killing
every process it started and everything they spawned (SuperExecs, the ServerApp, ClientApps,
Ray), found by the ``FLWR_HOME`` in their environment. Used by the deployment test and
``benchmarks/deployment.py``::

    with Loopback(Path("runs/loopback")) as dep:
        link = dep.superlink()
        nodes = [dep.supernode(i, 10) for i in range(10)]
        dep.wait_ready(link)
        run = dep.flwr_run(".", "preset='mnist-dir0.5-10' rounds=2 out-dir='/abs/out'")
        run.popen.wait()
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["BIN", "SUPERLINK_READY", "Loopback", "Proc", "alive", "free_port", "tagged"]

SUPERLINK_READY = "Uvicorn running on"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live here


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


def tagged(var: str, value: str) -> list[int]:
    """Pids of the processes whose environment has ``var=value`` (what a :class:`Loopback`
    started, and everything they spawned: the SuperLink and Ray detach into their own sessions)."""
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
    """SIGKILL ``pids``, their descendants and their process groups; return the pids hit."""
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


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
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

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the log matches ``pattern``; a TimeoutError with the log's tail otherwise
        (sooner if the process ends)."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := regex.search(self.text()):
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.3)
        raise TimeoutError(
            f"{self.name}: no {regex.pattern!r} within {timeout:.0f} s "
            f"(exit code {self.popen.poll()}); log tail:\n{self.text()[-3000:]}"
        )

    def kill(self) -> list[int]:
        """SIGKILL the process, its process group and every descendant; return the pids hit."""
        pids = _kill_all([self.popen.pid])
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        return pids


class Loopback:
    """A SuperLink and SuperNodes on loopback, plus a Flower config with a ``loopback``
    connection to them; a context manager that stops everything on exit (see the module)."""

    connection = "loopback"

    def __init__(self, root: Path, threads: int = 1) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = root / "flwr-home"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink spawns flower-superexec
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else the SuperLink runs `uv sync`
            "OMP_NUM_THREADS": str(threads),  # per process: many nodes share few cores
        }
        self.procs: list[Proc] = []
        self.port = 0

    def __enter__(self) -> Loopback:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.env, self.logs, cwd=self.root)
        self.procs.append(proc)
        return proc

    def superlink(self) -> Proc:
        self.port = free_port()
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
        """A SuperNode holding partition ``partition`` of ``partitions`` (its node config)."""
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
                str(free_port()),
            ],
        )

    def flwr_run(self, app: str | Path, run_config: str) -> Proc:
        """``flwr run app loopback --run-config ... --stream``: prints the ServerApp's logs and
        ends with the run."""
        args = [str(BIN / "flwr"), "run", str(app), self.connection]
        return self.start("flwr-run", [*args, "--run-config", run_config, "--stream"])

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pids(self) -> list[int]:
        """Every live process of this deployment (started here or spawned by those)."""
        return tagged("FLWR_HOME", str(self.home))

    def stop(self) -> None:
        """Kill every process of the deployment; a RuntimeError names any that survive."""
        pids: list[int] = []
        for proc in reversed(self.procs):  # nodes first, then the SuperLink
            pids += proc.kill()
        pids += _kill_all(self.pids())  # detached ones (SuperExec, Ray)
        deadline = time.monotonic() + 10
        while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            raise RuntimeError(f"processes survived the teardown: {left}")

    def dump_logs(self) -> str:
        return "\n".join(f"----- {p.name}\n{p.text()[-2500:]}" for p in self.procs)
