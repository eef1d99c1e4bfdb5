"""bfloat16 against fp32 on this machine: DM iterations, evaluation training, and accuracy.

In one process, both precisions on the same data and seeds (the fp32 run is the reference):

* seconds per DM iteration on MNIST, 10 images per class, at 64 and 256 real images per class
  (median over ``--iterations`` after 2 warm-up iterations);
* seconds per evaluation epoch of a 100-image MNIST set (300-epoch protocol's network and
  optimizer; median over ``--epochs`` epochs after one warm-up);
* accuracy of the evaluation protocol on digits (10 real images per class, 3 seeds each), to
  compare the precisions' difference with the seed-to-seed spread.

Writes JSON with the issue's named targets (``dm-bf16-speedup``: the smaller of the two real
batch sizes' ratios; ``eval-bf16-speedup``; ``eval-floor-ratio``: the fp32 epoch against its
FLOPs, counted by torch's FLOP counter, at the rate this machine reaches on the ConvNet's
widest convolution, :func:`speed.conv_rate`; ``eval-compiled-floor-ratio``: the same on
evaluation's opt-in compiled path).

    OMP_NUM_THREADS=1 python benchmarks/precision.py --json benchmarks/results/precision_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import machine
from speed import conv_rate
from targets import target
from torch.utils.flop_counter import FlopCounterMode

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.augment import DSA
from fedcl_dd.compiled import compile_embedding
from fedcl_dd.data import DatasetSpec, load_dataset
from fedcl_dd.distill import Callback, DistillState
from fedcl_dd.evaluate import evaluate, train_epochs
from fedcl_dd.models import make_model
from fedcl_dd.pipeline import Distillation
from fedcl_dd.precision import Precision
from fedcl_dd.recipe import Recipe
from fedcl_dd.sampling import ClassSampler


class _Stamps(Callback):
    """Wall-clock time at the end of every iteration."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_start(self, state: DistillState, total: int) -> None:
        self.times.append(time.perf_counter())

    def on_iteration(self, state: DistillState) -> None:
        self.times.append(time.perf_counter())


def dm_seconds(
    real: ClassSampler, spec: DatasetSpec, real_per_class: int, iterations: int, precision: str
) -> float:
    stamps = _Stamps()
    recipe = Recipe(ipc=10, iterations=iterations + 2, options={"real_per_class": real_per_class})
    Distillation(recipe, real, spec, seed=0, precision=precision).run([stamps])
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]
    return statistics.median(steps[2:])


def eval_epoch(
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: DatasetSpec,
    epochs: int,
    precision: str,
    compile_mode: str | None = None,
) -> tuple[float, int]:
    """Median seconds of one evaluation epoch (after a warm-up, which also compiles), and the
    FLOPs of one more (0 when compiled: the counter would break the graphs; same work)."""
    gen = torch.Generator().manual_seed(0)
    net = make_model("convnet", spec.channels, spec.num_classes, spec.image_size, gen)
    if compile_mode is not None:
        compile_embedding(net, compile_mode)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    aug = DSA(spec.dsa_strategy, gen)
    mode = Precision.resolve(precision, "cpu")

    def epoch() -> None:
        train_epochs(net, opt, images, labels, 1, 256, aug, gen, precision=mode)

    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    if compile_mode is not None:
        return statistics.median(times[1:]), 0
    with FlopCounterMode(display=False) as counter:
        epoch()
    return statistics.median(times[1:]), counter.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--iterations", type=int, default=7)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--json", default="benchmarks/results/precision_cpu.json")
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator as it is (the figures before fedcl_dd.allocator)",
    )
    args = p.parse_args()
    if not args.default_allocator:
        keep_freed_memory()
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:])
    mnist = load_dataset("mnist")
    real = ClassSampler(mnist.train_x, mnist.train_y, mnist.spec.num_classes)
    rows: dict[str, dict[str, float]] = {}
    for rpc in (64, 256):
        rows[f"dm-{rpc}"] = {
            prec: dm_seconds(real, mnist.spec, rpc, args.iterations, prec)
            for prec in ("fp32", "bf16")
        }
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(mnist.train_y.numel(), generator=gen)[:100]
    epochs = {
        prec: eval_epoch(mnist.train_x[idx], mnist.train_y[idx], mnist.spec, args.epochs, prec)
        for prec in ("fp32", "bf16")
    }
    rows["eval-epoch"] = {prec: seconds for prec, (seconds, _) in epochs.items()}
    # Evaluation's opt-in --compile path (fedcl_dd.compiled), both precisions.
    rows["eval-compiled"] = {
        prec: eval_epoch(
            mnist.train_x[idx], mnist.train_y[idx], mnist.spec, args.epochs, prec, "default"
        )[0]
        for prec in ("fp32", "bf16")
    }
    rate = conv_rate(torch.device("cpu"))
    eval_floor = epochs["fp32"][1] / rate
    digits = load_dataset("digits")
    small = ClassSampler(digits.train_x, digits.train_y, digits.spec.num_classes)
    subset = Recipe(ipc=10).init_synthetic(small, digits.spec, torch.Generator().manual_seed(0))
    accuracy = {
        prec: [
            evaluate(
                subset,
                digits.test_x,
                digits.test_y,
                digits.spec,
                num_models=1,
                seed=s,
                precision=prec,
            ).mean
            for s in range(3)
        ]
        for prec in ("fp32", "bf16")
    }
    print(f"{'what':<12}{'fp32 s':>10}{'bf16 s':>10}{'speed-up':>10}")
    for name, r in rows.items():
        print(f"{name:<12}{r['fp32']:>10.3f}{r['bf16']:>10.3f}{r['fp32'] / r['bf16']:>10.2f}")
    for prec, accs in accuracy.items():
        print(
            f"digits accuracy {prec}: {statistics.fmean(accs):.4f} ± {statistics.pstdev(accs):.4f}"
        )
    dm_speedup = min(rows[f"dm-{rpc}"]["fp32"] / rows[f"dm-{rpc}"]["bf16"] for rpc in (64, 256))
    eval_speedup = rows["eval-epoch"]["fp32"] / rows["eval-epoch"]["bf16"]
    eval_ratio = rows["eval-epoch"]["fp32"] / eval_floor
    compiled_ratio = rows["eval-compiled"]["fp32"] / eval_floor
    print(
        f"eval epoch: {epochs['fp32'][1] / 1e9:.2f} GFLOP, floor {eval_floor:.3f} s at "
        f"{rate / 1e9:.0f} GFLOP/s: {eval_ratio:.2f}x floor eager, {compiled_ratio:.2f}x compiled"
    )
    out = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "seconds": rows,
        "digits_accuracy": accuracy,
        "eval_epoch_flops": epochs["fp32"][1],
        "conv_rate": rate,
        "targets": [
            target("dm-bf16-speedup", dm_speedup, 1.8, ">=", "ratio", command),
            target("eval-bf16-speedup", eval_speedup, 2.0, ">=", "ratio", command),
            target("eval-floor-ratio", eval_ratio, 1.15, "<=", "ratio", command),
            target("eval-compiled-floor-ratio", compiled_ratio, 1.15, "<=", "ratio", command),
        ],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
