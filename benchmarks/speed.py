"""Seconds per distillation iteration, FLOP floor and peak memory, per method.

For each method this runs a few iterations of the shared loop on real data and
prints: median seconds per iteration, the matmul/conv FLOPs of one iteration
(counted by torch's FlopCounterMode), the *FLOP floor* (those FLOPs divided by
the rate this machine reaches on the ConvNet's own dominant convolution,
measured in the same run), their ratio, and the peak memory of two iterations
(CUDA: max allocated; CPU: peak resident set above the resident set before the
iterations, in a fresh process per method).

A second reference for DM: the same objective computed the way the original
code does (one forward pass per class on each side), timed in the same run.

    python benchmarks/speed.py --dataset mnist --ipc 10 --real-per-class 64
    # the scaling table: one factor at a time around 10 images and 64 real images per class
    python benchmarks/speed.py --methods dm dm-dp idm ncfm gm tm --datasets mnist cifar10 \
        --ipcs 1 10 50 --reals 64 256 1024 --iterations 3 --json benchmarks/results/speed_scaling.json
    # a method is "name[:option=value,...]": here one short expert for tm (set-up, not timed)
    python benchmarks/speed.py --methods dm gm dm-dp:noise_multiplier=1 \
        tm:num_experts=1,expert_train_epochs=2,max_start_epoch=0 \
        tm:num_experts=1,expert_train_epochs=2,max_start_epoch=0,constant_memory=true --json out/speed.json
    # eager and torch.compile'd matching networks side by side (fedcl_dd.compiled)
    python benchmarks/speed.py --methods dm --ipcs 1 10 50 --reals 64 256 --compile --iterations 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from machine import machine
from procmem import peak_since_reset, reset_peak
from targets import target
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import add_compile_flag, resolve_device
from fedcl_dd.data import data_root, load_dataset
from fedcl_dd.distill import Callback, DistillConfig, DistillState, distill
from fedcl_dd.io import write_json
from fedcl_dd.models import embed
from fedcl_dd.objectives import DistributionMatching, MatchingContext
from fedcl_dd.pipeline import Distillation
from fedcl_dd.recipe import Recipe
from fedcl_dd.registry import get_objective, register_objective
from fedcl_dd.sampling import ClassSampler
from fedcl_dd.synthetic import SyntheticSet


@register_objective
class LoopedDM(DistributionMatching):
    """DM as the original code computes it: one forward pass per class and side (the reference,
    registered in this script's process only)."""

    name = "dm-looped"

    def loss(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        params = ctx.siamese()
        total = torch.zeros(())
        for c in syn.classes:
            real = ctx.real.sample(c, self.real_per_class, ctx.generator)
            with torch.no_grad():
                r = embed(net, ctx.apply(real, params)).mean(0)
            s = embed(net, ctx.apply(syn.images()[syn.class_ids == c], params)).mean(0)
            total = total + ((r - s) ** 2).sum()
        return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def conv_rate(device: torch.device, batch: int = 256, repeats: int = 5) -> float:
    """FLOP/s this machine reaches on the ConvNet's 128->128 3x3 convolution at 16x16 (forward)."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device)
    x = torch.randn(batch, 128, 16, 16, device=device)
    flops = 2 * batch * 128 * 128 * 9 * 16 * 16
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            _sync(device)
            t = time.perf_counter()
            conv(x)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return flops / min(times)


def parse_method(spec: str) -> tuple[str, dict[str, str]]:
    """``name[:option=value,...]`` as the method's name and its options (values parsed by the recipe)."""
    name, _, rest = spec.partition(":")
    pairs = [item.partition("=") for item in rest.split(",") if item]
    bad = [k for k, sep, _ in pairs if not sep]
    if bad:
        raise SystemExit(f"method {spec!r}: expected option=value, got {bad}")
    return name, {k.replace("-", "_"): v for k, _, v in pairs}


def build(args: argparse.Namespace, spec: str, device: torch.device) -> tuple[Distillation, Recipe]:
    name, options = parse_method(spec)
    if "real_per_class" in {o.name for o in get_objective(name).options}:
        options.setdefault("real_per_class", str(args.real_per_class))
    ds = load_dataset(args.dataset, args.data_root)
    real = ClassSampler(ds.train_x, ds.train_y, ds.spec.num_classes, device)
    recipe = Recipe(method=name, ipc=args.ipc, param=args.param, options=options)
    return Distillation(
        recipe, real, ds.spec, seed=0, device=device, cache_dir=data_root(args.data_root)
    ), recipe


class _Clock(Callback):
    """Records the wall time of every iteration of one run."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.last = device, 0.0
        self.times: list[float] = []

    def on_start(self, state: DistillState, total: int) -> None:
        _sync(self.device)
        self.last = time.perf_counter()

    def on_iteration(self, state: DistillState) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def measure(args: argparse.Namespace, method: str, compile_mode: str | None = None) -> dict:
    """Median seconds per iteration after the first, and (eager only) the FLOPs of one.

    Compiled, the first iteration also compiles, so its excess over the median is the compile
    time (cold in :func:`in_fresh_process`); the FLOPs are the eager run's (the same work; the
    counter would break the compiled graphs).
    """
    device = resolve_device(args.device)
    run, recipe = build(args, method, device)
    syn, objective, ctx = run.syn, run.objective, run.ctx
    clock = _Clock(device)
    config = DistillConfig(args.iterations + 1, recipe.lr, compile=compile_mode)
    distill(syn, objective, ctx, config, [clock])
    median = statistics.median(clock.times[1:])  # the first one warms up (and compiles)
    row = {
        "method": method,
        "compile": compile_mode,
        "seconds_per_iteration": median,
        "first_iteration_seconds": clock.times[0],
        "num_images": syn.num_images,
    }
    if compile_mode is None:
        with FlopCounterMode(display=False) as counter:
            distill(syn, objective, ctx, DistillConfig(1, recipe.lr))
        row["flops"] = counter.get_total_flops()
    return row


def compiled_row(eager: dict, compiled: dict) -> dict:
    """The compiled measurement beside its eager twin: FLOPs, compile seconds and payback."""
    saved = eager["seconds_per_iteration"] - compiled["seconds_per_iteration"]
    compile_seconds = compiled["first_iteration_seconds"] - compiled["seconds_per_iteration"]
    return {
        **eager,
        **compiled,
        "flops": eager["flops"],
        "speedup_over_eager": eager["seconds_per_iteration"] / compiled["seconds_per_iteration"],
        "compile_seconds": compile_seconds,
        # Iterations after which the compile time is back (None: compiled is not faster).
        "payback_iterations": compile_seconds / saved if saved > 0 else None,
    }


def in_fresh_process(
    args: argparse.Namespace, method: str, compile_mode: str | None, task: str
) -> str:
    """The last line this script prints as a child doing ``task`` ("peak" or "time") for one
    method: a fresh process, with a TorchInductor cache folder of its own, so that a compiled
    run compiles cold, as a user's first run does, whatever earlier rows compiled."""
    cmd = [sys.executable, __file__, "--child", method, "--child-task", task, *_forward(args)]
    cmd += ["--compile", compile_mode] if compile_mode else []
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="speed-inductor-")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return out.strip().splitlines()[-1]


def peak_memory(args: argparse.Namespace, method: str, compile_mode: str | None = None) -> float:
    """Peak memory of a fresh process that runs the method (MiB above its start-up)."""
    return float(in_fresh_process(args, method, compile_mode, "peak"))


def _forward(args: argparse.Namespace) -> list[str]:
    out = [
        "--dataset",
        args.dataset,
        "--ipc",
        str(args.ipc),
        "--real-per-class",
        str(args.real_per_class),
        "--param",
        args.param,
        "--iterations",
        str(args.iterations),
        "--device",
        args.device,
    ]
    return out + (["--data-root", args.data_root] if args.data_root else [])


def child(args: argparse.Namespace) -> None:
    if args.child_task == "time":
        print(json.dumps(measure(args, args.child, args.compile)))
        return
    device = resolve_device(args.device)
    run, recipe = build(args, args.child, device)
    syn, objective, ctx = run.syn, run.objective, run.ctx
    objective.setup(ctx, syn)  # set-up (experts) is not an iteration
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Reset the peak resident set (Linux: writing 5 to clear_refs), so data loading does not count.
        base = reset_peak()
    distill(syn, objective, ctx, DistillConfig(2, recipe.lr, compile=args.compile))
    if device.type == "cuda":
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        print(peak_since_reset() - base)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--param", default="pixels")
    p.add_argument("--real-per-class", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["dm", "dm-looped"])
    p.add_argument(
        "--datasets", nargs="+", default=None, help="scaling table: each of these datasets"
    )
    p.add_argument(
        "--ipcs", type=int, nargs="+", default=None, help="scaling table: images per class"
    )
    p.add_argument(
        "--reals", type=int, nargs="+", default=None, help="scaling table: real images per class"
    )
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per method")
    add_compile_flag(
        p,
        "also measure every method with its matching networks compiled in this mode "
        "(rows beside the eager ones, with compile seconds and payback iterations)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-task", default="peak", choices=["peak", "time"], help=argparse.SUPPRESS)
    args = p.parse_args()
    keep_freed_memory()
    if args.child:
        child(args)
        return
    device = resolve_device(args.device)
    rate = conv_rate(device)
    rows = []
    for cell in cells(args):
        for method in args.methods:
            name, _ = parse_method(method)
            declared = {o.name for o in get_objective(name).options}
            if cell.real_per_class != args.real_per_class and "real_per_class" not in declared:
                continue  # the real batch is not this method's to set: that row is the centre's
            eager = measure(cell, method)
            variants = [eager]
            # Only the distribution-matching family's networks compile (fedcl_dd.compiled).
            if args.compile and issubclass(get_objective(name), DistributionMatching):
                timed = json.loads(in_fresh_process(cell, method, args.compile, "time"))
                variants.append(compiled_row(eager, timed))
            for measured in variants:
                row = {"dataset": cell.dataset, "ipc": cell.ipc, **measured}
                row["real_per_class"] = (
                    cell.real_per_class if "real_per_class" in declared else None
                )
                row["floor_seconds"] = row["flops"] / rate
                row["ratio_to_floor"] = row["seconds_per_iteration"] / row["floor_seconds"]
                row["achieved_tflops"] = row["flops"] / row["seconds_per_iteration"] / 1e12
                row["peak_mib"] = peak_memory(cell, method, measured["compile"])
                rows.append(row)
    print(
        f"\n{args.param}, DSA on, device {device}, torch threads {torch.get_num_threads()}; "
        f"reference conv rate {rate / 1e9:.1f} GFLOP/s"
    )
    head = (
        f"{'dataset':8} {'ipc':>4} {'real':>5} {'method':10} {'compile':>8} {'s/iter':>8} "
        f"{'GFLOP':>8} {'floor s':>8} {'x floor':>8} {'TFLOP/s':>8} {'peak MiB':>9} "
        f"{'x eager':>8} {'comp. s':>8} {'payback':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        real = "-" if r["real_per_class"] is None else str(r["real_per_class"])
        extra = ""
        if r["compile"]:
            payback = r["payback_iterations"]
            extra = (
                f" {r['speedup_over_eager']:8.2f} {r['compile_seconds']:8.1f} "
                f"{'never' if payback is None else f'{payback:.0f}':>8}"
            )
        print(
            f"{r['dataset']:8} {r['ipc']:4d} {real:>5} {r['method']:10} {r['compile'] or 'eager':>8} "
            f"{r['seconds_per_iteration']:8.3f} {r['flops'] / 1e9:8.1f} {r['floor_seconds']:8.3f} "
            f"{r['ratio_to_floor']:8.2f} {r['achieved_tflops']:8.3f} {r['peak_mib']:9.0f}" + extra
        )
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    # Issue 11's target: DM on MNIST at 10 images per class within 1.15x of its FLOP floor.
    targets = [
        target(
            f"dm-mnist-{r['real_per_class']}{'-compiled' if r['compile'] else ''}-floor-ratio",
            r["ratio_to_floor"],
            1.15,
            "<=",
            "ratio",
            command,
        )
        for r in rows
        if (r["method"], r["dataset"], r["ipc"]) == ("dm", "mnist", 10)
    ]
    for t in targets:
        print(f"target {t['name']}: {t['value']:.2f} ({t['op']} {t['target']})")
    if args.json:
        write_json(
            {
                "machine": machine(),
                "device": str(device),
                "conv_rate": rate,
                "rows": rows,
                "targets": targets,
                "args": {k: v for k, v in vars(args).items() if k != "child"},
            },
            args.json,
        )


def cells(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The settings to measure, one factor at a time around ``--ipc`` and ``--real-per-class``:
    every dataset at the centre, then each of ``--ipcs`` and of ``--reals`` on its own."""
    out = []
    for dataset in args.datasets or [args.dataset]:
        points = [(args.ipc, args.real_per_class)]
        points += [(i, args.real_per_class) for i in args.ipcs or [] if i != args.ipc]
        points += [(args.ipc, r) for r in args.reals or [] if r != args.real_per_class]
        for ipc, real in points:
            out.append(
                argparse.Namespace(
                    **{**vars(args), "dataset": dataset, "ipc": ipc, "real_per_class": real}
                )
            )
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
