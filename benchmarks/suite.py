"""Wall-clock minutes of ``make test`` (lint, types and the whole suite, slow tests included).

Runs the command as CI does, times it end to end, keeps pytest's closing summary line and
writes JSON with issue 11's named target ``suite-minutes`` (< 10). Run it on a quiet machine:
anything else on the cores slows the suite by as much.

    python benchmarks/suite.py --json benchmarks/results/suite.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from machine import machine
from targets import target

from fedcl_dd.io import write_json

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--command", default="make test", help="what to time, run from the root")
    p.add_argument("--json", default="benchmarks/results/suite.json")
    args = p.parse_args()
    start = time.perf_counter()
    proc = subprocess.run(
        args.command, shell=True, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy()
    )
    minutes = (time.perf_counter() - start) / 60
    out = proc.stdout + proc.stderr
    # pytest's last line, e.g. "406 passed, 11 xfailed in 498.12s (0:08:18)".
    summary = [ln.strip("= ") for ln in out.splitlines() if re.search(r"\d+ passed", ln)]
    # --durations: lines such as "61.02s call     tests/test_x.py::test_y".
    slowest = [
        ln.strip()
        for ln in out.splitlines()
        if re.match(r"\s*\d+\.\d+s (call|setup|teardown) ", ln)
    ]
    # pytest's short summary names each failure: "FAILED tests/test_x.py::test_y - ...".
    failed = [ln.strip() for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    print(f"{args.command}: rc {proc.returncode}, {minutes:.2f} min")
    print(summary[-1] if summary else out[-2000:])
    print("\n".join(failed + slowest))
    command = "python benchmarks/suite.py " + " ".join(sys.argv[1:])
    write_json(
        {
            "command": args.command,
            "returncode": proc.returncode,
            "minutes": minutes,
            "pytest_summary": summary[-1] if summary else None,
            "failed": failed,
            "slowest": slowest,
            "machine": machine(),
            # A suite that fails has not met its time, however fast it failed.
            "targets": [
                target(
                    "suite-minutes",
                    minutes if proc.returncode == 0 else None,
                    10.0,
                    "<",
                    "minutes",
                    command,
                )
            ],
        },
        args.json,
    )
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
