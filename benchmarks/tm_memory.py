"""Peak memory of trajectory matching against the number of synthetic steps: MTT vs TESLA.

MTT back-propagates through the whole unrolled student trajectory, so its memory
grows with ``syn_steps``; TESLA (``constant_memory=True``) recomputes one step at
a time and should stay flat. Each configuration runs in a fresh process (after
the experts are trained or loaded, which is not counted) and reports the peak
memory of two distillation iterations: CUDA max allocated, or on CPU the peak
resident set above the resident set before the iterations.

Target: TESLA's peak at 80 steps <= 1.3x its peak at 10.

    python benchmarks/tm_memory.py --dataset mnist --ipc 10 --steps 10 20 40 80
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from procmem import peak_since_reset, reset_peak

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import resolve_device
from fedcl_dd.data import data_root, load_dataset
from fedcl_dd.pipeline import Distillation
from fedcl_dd.recipe import Recipe
from fedcl_dd.sampling import ClassSampler


def child(args: argparse.Namespace, steps: int, tesla: bool) -> float:
    device = resolve_device(args.device)
    ds = load_dataset(args.dataset, args.data_root)
    real = ClassSampler(ds.train_x, ds.train_y, ds.spec.num_classes, device)
    recipe = Recipe(
        method="tm",
        ipc=args.ipc,
        iterations=2,
        options={
            "syn_steps": steps,
            "constant_memory": tesla,
            "batch_syn": args.batch_syn,
            "num_experts": args.experts,
            "expert_train_epochs": args.expert_epochs,
            "max_start_epoch": args.expert_epochs - 2,
        },
    )
    run = Distillation(
        recipe, real, ds.spec, seed=0, device=device, cache_dir=data_root(args.data_root)
    )
    run.objective.setup(run.ctx, run.syn)  # experts: trained once, then cached; not measured
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak()
    run.run()
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_since_reset() - base


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=100)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--expert-epochs", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="benchmarks/results/tm_memory.json")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    keep_freed_memory()
    if args.child:
        print(child(args, int(args.child[0]), args.child[1] == "tesla"))
        return
    rows = []
    for mode in ("mtt", "tesla"):
        for steps in args.steps:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(steps),
                mode,
                "--dataset",
                args.dataset,
                "--ipc",
                str(args.ipc),
                "--batch-syn",
                str(args.batch_syn),
                "--experts",
                str(args.experts),
                "--expert-epochs",
                str(args.expert_epochs),
                "--device",
                args.device,
            ]
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(
                {"mode": mode, "syn_steps": steps, "peak_mib": float(out.strip().splitlines()[-1])}
            )
            print(rows[-1], flush=True)
    print(
        f"\n{args.dataset}, {args.ipc} images/class, batch_syn {args.batch_syn}, device {resolve_device(args.device)}"
    )
    print(f"{'mode':6} " + " ".join(f"{s:>9}" for s in args.steps) + "   ratio last/first")
    for mode in ("mtt", "tesla"):
        peaks = [r["peak_mib"] for r in rows if r["mode"] == mode]
        print(
            f"{mode:6} " + " ".join(f"{m:9.0f}" for m in peaks) + f"   {peaks[-1] / peaks[0]:.2f}x"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"rows": rows, "args": {k: v for k, v in vars(args).items() if k != "child"}}, indent=2
        )
    )


if __name__ == "__main__":
    main()
