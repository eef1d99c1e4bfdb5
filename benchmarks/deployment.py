"""A federated run deployed on loopback: a real SuperLink and one SuperNode per client.

The same apps and run configuration as the simulation (``benchmarks/federated.py``), but each
client is its own SuperNode process, each round's ClientApps are processes those nodes start,
and every message goes through the SuperLink over HTTP on 127.0.0.1
(:class:`fedcl_dd.strategies.flower.loopback.Loopback`). Reported: the run's rounds (accuracy,
bytes up and down, client and server seconds), seconds per round as the ServerApp's log shows
them (from the round's start to the next), the start-up before round 1, and the peak memory
of every process of the deployment together, sampled every 0.5 s: proportional set sizes
summed (pages the processes share, such as torch's libraries, counted once), with the summed
resident sets beside it (shared pages once per process, an overstatement).

    python benchmarks/deployment.py --nodes 10 --preset mnist-dir0.5-10 --rounds 2 --set iterations=100
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.loopback import Loopback
from fedcl_dd.strategies.flower.report import format_table
from machine import machine
from procmem import PeakTreeMemory

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import parse_settings
from fedcl_dd.io import write_json

REPO = Path(__file__).resolve().parents[1]
ROUND_START = re.compile(r"\[ROUND (\d+)/\d+\]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="mnist-dir0.5-10")
    p.add_argument(
        "--nodes", type=int, default=None, help="SuperNodes (default: the preset's clients)"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run-config settings"
    )
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds before giving up")
    p.add_argument("--out", default="benchmarks/results/deployment")
    args = p.parse_args(argv)
    keep_freed_memory()

    try:
        settings = parse_settings(args.set, own_flags={"preset": "--preset", "rounds": "--rounds"})
    except ValueError as err:
        p.error(str(err))
    values: dict[str, str] = {**settings, "preset": args.preset, "rounds": str(args.rounds)}
    cfg = FedConfig.from_mapping(values)  # refuses bad settings before any process starts
    nodes = args.nodes or cfg.preset_obj.num_clients
    out = Path(args.out).resolve()  # the ServerApp runs in the SuperLink's working directory
    out.mkdir(parents=True, exist_ok=True)
    quoted = {
        k: v if _is_number(v) or v in ("true", "false") else f"'{v}'" for k, v in values.items()
    }
    run_config = " ".join(f"{k}={v}" for k, v in {**quoted, "out-dir": f"'{out}'"}.items())

    with tempfile.TemporaryDirectory(prefix="fedcl-loopback-") as tmp, Loopback(Path(tmp)) as dep:
        started = time.monotonic()
        with PeakTreeMemory(interval=0.5, pids=dep.pids) as mem:
            link = dep.superlink()
            for i in range(nodes):
                dep.supernode(i, nodes)
            dep.wait_ready(link)
            run = dep.flwr_run(REPO, run_config)
            round_starts: dict[int, float] = {}
            while run.popen.poll() is None:
                for m in ROUND_START.finditer(run.text()):
                    round_starts.setdefault(int(m.group(1)), time.monotonic() - started)
                if time.monotonic() - started > args.timeout:
                    raise TimeoutError(
                        f"the run took over {args.timeout:.0f} s; log tail:\n{run.text()[-3000:]}"
                    )
                time.sleep(1)
            ended = time.monotonic() - started
        log = run.text()
        if run.popen.returncode != 0 or not (out / "results.json").is_file():
            print(dep.dump_logs(), file=sys.stderr)
            raise RuntimeError(f"flwr run ended with {run.popen.returncode}; logs above")
    (out / "flwr-run.log").write_text(log)

    results = json.loads((out / "results.json").read_text())
    marks = [round_starts[r] for r in sorted(round_starts)] + [ended]
    round_seconds = [b - a for a, b in itertools.pairwise(marks)]
    print(format_table({f"{nodes} nodes": results["rounds"]}))
    print(
        f"{nodes} SuperNodes on loopback, {args.rounds} rounds: start-up {marks[0]:.0f} s, "
        f"seconds per round {[round(s) for s in round_seconds]}, all {ended:.0f} s; "
        f"peak memory of every process {mem.peak / 1024:.2f} GiB PSS "
        f"({mem.peak_rss / 1024:.2f} GiB summed RSS)"
    )
    write_json(
        {
            "machine": machine(),
            "preset": args.preset,
            "nodes": nodes,
            "run_config": run_config,
            "startup_seconds": marks[0],
            "round_seconds": round_seconds,
            "seconds": ended,
            "peak_mib": mem.peak,
            "peak_rss_mib": mem.peak_rss,
            "rounds": results["rounds"],
            "command": "python benchmarks/deployment.py " + " ".join(argv or sys.argv[1:]),
            "targets": [],  # the issue names no target for this row; it reports it
        },
        out / "summary.json",
    )
    print(f"wrote {out}/summary.json")
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
