"""The prepared GPU benchmark (issue 11, item 5): one command, under 8 minutes on an H200.

Measures, on the CUDA device, in fp32 and bfloat16 (``--precision``'s machinery,
:mod:`fedcl_dd.precision`):

* a DM iteration at 256 real images per class, 10 images per class, on MNIST and CIFAR-10
  (median milliseconds over ``--iterations`` after ``--warmup``, synchronized each iteration);
* the evaluation of a 100-image set (the random real start, 10 per class) by the project's
  protocol (:func:`fedcl_dd.evaluate.evaluate`: 300 epochs, 3 networks, then the test set);
* one FedDM client round: what the Flower client's distillation does for one partition in
  round 2 (:class:`~fedcl_dd.pipeline.Distillation` with the client's recipe, seed and
  perturbed global networks; no Flower process, no Ray). It needs ``flwr`` and
  ``flwr-datasets``; without them the row is skipped with the reason.

Each with achieved TFLOP/s (matmul/conv FLOPs from torch's FlopCounterMode, as
``speed.py`` counts them) and peak memory (``torch.cuda.max_memory_allocated``; on CPU the
peak resident set above the start of the measurement). Then, where time is left, the DM
rows in fp32 again with ``torch.compile`` of the matching network's embedding (each
``--compile-modes``; ``reduce-overhead`` adds CUDA graphs), reporting the speed-up, the
compile seconds and the iterations after which they pay back; a failure leaves eager with
the reason printed. Evaluation stays eager: :func:`~fedcl_dd.evaluate.evaluate` builds its
networks inside the core, which offers no hook to compile them.

Writes ``benchmarks/results/gpu_<device>.json`` with the named targets ``h200-dm256-ms``
(the MNIST fp32 DM iteration, eager as ``fedcl-dd distill`` runs it, <= 20 ms) and
``h200-eval-s`` (the fp32 evaluation, all its networks, <= 10 s) and
prints a table. On a CPU it refuses to run unless ``--smoke`` is given, which runs tiny sizes
(digits, a few iterations and epochs) to check the code path in well under a minute.

    benchmarks/gpu.sh shared/data                     # import the data, then this script
    python benchmarks/gpu.py                          # data root already filled
    OMP_NUM_THREADS=1 python benchmarks/gpu.py --smoke   # CPU: the code path only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from procmem import peak_since_reset, reset_peak
from speed import _Clock, _sync
from targets import target
from torch.utils.flop_counter import FlopCounterMode

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import resolve_device
from fedcl_dd.data import Dataset, load_dataset
from fedcl_dd.distill import distill
from fedcl_dd.evaluate import evaluate
from fedcl_dd.models import make_model
from fedcl_dd.pipeline import Distillation
from fedcl_dd.precision import PRECISIONS, Precision
from fedcl_dd.recipe import Recipe
from fedcl_dd.sampling import ClassSampler


@dataclasses.dataclass
class Sizes:
    """What one run measures (the full sizes, or ``--smoke``'s tiny ones)."""

    datasets: tuple[str, ...]
    real_per_class: int
    warmup: int
    iterations: int
    eval_epochs: int
    eval_nets: int
    preset: str
    round_iterations: int


# 256 real images per class and 200 iterations a round are also the defaults of a federated run.
FULL = Sizes(("mnist", "cifar10"), 256, 3, 20, 300, 3, "mnist-dir0.5-10", 200)
SMOKE = Sizes(("digits",), 16, 1, 2, 2, 1, "digits-dir0.5-4", 2)


@dataclasses.dataclass
class Row:
    """One measurement: ``seconds`` per unit of work (a DM iteration, an evaluation, a round)."""

    what: str
    precision: str
    seconds: float
    flops: float
    peak_mib: float
    note: str = ""

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12


class PeakMemory:
    """Peak memory of the block in MiB: CUDA's max allocated, or the CPU's peak resident set
    above the one at entry (Linux; the datasets loaded before do not count)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.base, self.mib = device, 0.0, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mib = peak_since_reset() - self.base


def counted_flops(work: Callable[[], object]) -> float:
    """Matmul/conv FLOPs of ``work()`` (torch's FlopCounterMode, as speed.py counts them)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())


def dm_iteration(
    ds: Dataset,
    real: ClassSampler,
    sizes: Sizes,
    precision: str,
    device: torch.device,
    compile_mode: str | None = None,
) -> tuple[list[float], float, float]:
    """Seconds of every DM iteration (warm-up first), FLOPs of one, and peak MiB."""
    recipe = Recipe(ipc=10, options={"real_per_class": sizes.real_per_class})
    run = Distillation(
        recipe, real, ds.spec, seed=0, device=device, precision=precision, compile=compile_mode
    )
    clock = _Clock(device)
    config = dataclasses.replace(run.config, iterations=sizes.warmup + sizes.iterations)
    with PeakMemory(device) as peak:
        distill(run.syn, run.objective, run.ctx, config, [clock])
    flops = 0.0
    if compile_mode is None:  # compiled code does the same work; the counter would break graphs
        one = dataclasses.replace(config, iterations=1)
        flops = counted_flops(lambda: distill(run.syn, run.objective, run.ctx, one))
    return clock.times, flops, peak.mib


def dm_row(
    ds: Dataset, real: ClassSampler, sizes: Sizes, precision: str, device: torch.device
) -> Row:
    times, flops, peak = dm_iteration(ds, real, sizes, precision, device)
    return Row(
        f"dm {ds.spec.name} {sizes.real_per_class} real/class, 10 ipc (per iteration)",
        precision,
        statistics.median(times[sizes.warmup :]),
        flops,
        peak,
    )


def eval_row(
    ds: Dataset, real: ClassSampler, sizes: Sizes, precision: str, device: torch.device
) -> Row:
    """The evaluation protocol on the random real start of 10 images per class."""
    syn = Recipe(ipc=10).init_synthetic(real, ds.spec, torch.Generator().manual_seed(0))
    test_x, test_y = ds.test_x.to(device), ds.test_y.to(device)

    def protocol(epochs: int, nets: int) -> float:
        _sync(device)
        start = time.perf_counter()
        evaluate(syn, test_x, test_y, ds.spec, num_models=nets, epochs=epochs, precision=precision)
        _sync(device)
        return time.perf_counter() - start

    # Every epoch of 100 images is one batch of the same shape, so one and two epochs give the
    # FLOPs of an epoch and of the test pass; these runs also warm up the kernels.
    one = counted_flops(lambda: protocol(1, 1))
    epoch = counted_flops(lambda: protocol(2, 1)) - one
    with PeakMemory(device) as peak:
        seconds = protocol(sizes.eval_epochs, sizes.eval_nets)
    flops = sizes.eval_nets * (one + (sizes.eval_epochs - 1) * epoch)
    what = f"eval {ds.spec.name} 100 images, {sizes.eval_epochs} epochs, {sizes.eval_nets} nets"
    return Row(what, precision, seconds, flops, peak.mib)


def feddm_round_row(sizes: Sizes, precision: str, device: torch.device, root: str | None) -> Row:
    """Partition 0's distillation in round 2 of an iterative (FedDM) run, as the client runs it."""
    from fedcl_dd.scenarios.federated import client_data
    from fedcl_dd.strategies.flower.client_app import perturbed_global
    from fedcl_dd.strategies.flower.config import FedConfig
    from fedcl_dd.strategies.flower.seeding import client_seed

    cfg = FedConfig(
        preset=sizes.preset,
        iterations=sizes.round_iterations,
        precision=precision,
        options={"real_per_class": sizes.real_per_class},
    )
    data = client_data(cfg.preset_obj, 0, root)
    spec = data.spec
    # The global model's weights do not change the work; a fresh network stands in for them.
    global_net = make_model(
        cfg.model, spec.channels, spec.num_classes, spec.image_size, torch.Generator(), device
    )
    real = ClassSampler(data.train_x, data.train_y, spec.num_classes, device)

    def client_round(iterations: int) -> None:
        Distillation(
            dataclasses.replace(cfg.recipe(), iterations=iterations),
            real,
            spec,
            seed=client_seed(cfg.seed, 2, 0),
            device=device,
            classes=data.classes,
            model=cfg.model,
            network_source=perturbed_global(global_net, cfg.perturb),
            planned_iterations=cfg.planned_iterations,
            precision=cfg.precision,
        ).run()

    # A one-iteration round warms the kernels up and gives the FLOPs of an iteration (every
    # iteration has the same shapes).
    per_iteration = counted_flops(lambda: client_round(1))
    with PeakMemory(device) as peak:
        _sync(device)
        start = time.perf_counter()
        client_round(cfg.iterations)
        _sync(device)
        seconds = time.perf_counter() - start
    what = f"feddm round {cfg.preset} client 0, {cfg.iterations} iterations"
    return Row(what, precision, seconds, per_iteration * cfg.iterations, peak.mib)


# A compiled network pays when its compile seconds come back within a default distillation
# run (`fedcl-dd distill --iterations`' default) and it saves at least this share per iteration.
PAYBACK_ITERATIONS = 1000
MIN_SAVING = 0.05
# Compile trials start only while this much of --budget-s is left (a compile takes ~10-60 s).
TRIAL_RESERVE_S = 120.0


def compile_trial(
    ds: Dataset, real: ClassSampler, sizes: Sizes, device: torch.device, mode: str, eager: Row
) -> dict[str, Any]:
    """The fp32 DM row again with the embedding compiled in ``mode``; whether it pays, and why."""
    out: dict[str, Any] = {"dataset": ds.spec.name, "mode": mode, "eager_ms": 1e3 * eager.seconds}
    torch._dynamo.reset()  # each mode compiles from scratch, not from the previous mode's cache
    try:
        times, _, peak = dm_iteration(ds, real, sizes, "fp32", device, compile_mode=mode)
    # A compiler can fail in many ways (no C++ compiler, an unsupported op): eager stays.
    except Exception as exc:
        reason = (
            f"compile failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
        return {**out, "pays": False, "reason": reason + "; eager kept"}
    median = statistics.median(times[sizes.warmup :])
    compile_s = max(0.0, sum(times[: sizes.warmup]) - sizes.warmup * median)
    saved = eager.seconds - median
    payback = compile_s / saved if saved > 0 else float("inf")
    pays = saved >= MIN_SAVING * eager.seconds and payback <= PAYBACK_ITERATIONS
    if pays:
        reason = f"{eager.seconds / median:.2f}x faster; compile pays back after {payback:.0f} iterations"
    elif saved < MIN_SAVING * eager.seconds:
        reason = f"saves {100 * saved / eager.seconds:.1f}% per iteration (< {100 * MIN_SAVING:.0f}%); eager kept"
    else:
        reason = f"compile pays back only after {payback:.0f} iterations (> {PAYBACK_ITERATIONS}); eager kept"
    return {
        **out,
        "compiled_ms": 1e3 * median,
        "compile_s": compile_s,
        "payback_iterations": payback,
        "peak_mib": peak,
        "pays": pays,
        "reason": reason,
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def precision_label(precision: str, device: torch.device) -> str:
    """``bf16``, or ``bf16->fp32`` where the device lacks it (fedcl_dd.precision warns why)."""
    return (
        precision
        if Precision.resolve(precision, device).active or precision == "fp32"
        else f"{precision}->fp32"
    )


def print_table(rows: list[Row], trials: list[dict[str, Any]], skipped: list[str]) -> None:
    head = f"{'what':<62} {'prec':<10} {'time':>10} {'TFLOP/s':>8} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        time_text = (
            f"{1e3 * r.seconds:.2f} ms" if r.what.startswith("dm ") else f"{r.seconds:.2f} s"
        )
        print(f"{r.what:<62} {r.precision:<10} {time_text:>10} {r.tflops:>8.3f} {r.peak_mib:>9.0f}")
    for t in trials:
        print(f"compile {t['dataset']} {t['mode']}: {t['reason']}")
    for s in skipped:
        print(f"skipped: {s}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes; the only way to run on a CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--compile-modes",
        nargs="*",
        default=None,
        help="torch.compile modes tried on the fp32 DM rows (default on CUDA: default "
        "reduce-overhead; with --smoke: none)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help=f"seconds this script may take: no compile trial starts with under {TRIAL_RESERVE_S:.0f} s left",
    )
    p.add_argument("--json", default=None, help="default: benchmarks/results/gpu_<device>.json")
    args = p.parse_args()
    keep_freed_memory()
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:
        print(
            f"no CUDA device ({device}): this benchmark is for GPUs; --smoke checks its code "
            "path on a CPU at tiny sizes",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    sizes = SMOKE if args.smoke else FULL
    modes = (
        args.compile_modes
        if args.compile_modes is not None
        else ([] if args.smoke else ["default", "reduce-overhead"])
    )
    name = device_name(device)
    if device.type == "cuda" and "h200" not in slug(name):
        print(f"note: the h200-* targets are stated for an H200; this device is {name}")
    rows: list[Row] = []
    skipped: list[str] = []
    loaded: dict[str, tuple[Dataset, ClassSampler]] = {}
    for dataset in sizes.datasets:
        ds = load_dataset(dataset, args.data_root)
        real = ClassSampler(ds.train_x, ds.train_y, ds.spec.num_classes, device)
        loaded[dataset] = (ds, real)
        for precision in PRECISIONS:
            row = dm_row(ds, real, sizes, precision, device)
            rows.append(dataclasses.replace(row, precision=precision_label(precision, device)))
    ds, real = loaded[sizes.datasets[0]]
    for precision in PRECISIONS:
        row = eval_row(ds, real, sizes, precision, device)
        rows.append(dataclasses.replace(row, precision=precision_label(precision, device)))
    for precision in PRECISIONS:
        try:
            row = feddm_round_row(sizes, precision, device, args.data_root)
        except ImportError as exc:  # flwr / flwr-datasets not installed (e.g. a bare GPU image)
            skipped.append(f"FedDM client round ({precision}): {exc}")
            continue
        rows.append(dataclasses.replace(row, precision=precision_label(precision, device)))
    trials: list[dict[str, Any]] = []
    for dataset, (ds, real) in loaded.items():
        eager = next(
            r for r in rows if r.what.startswith(f"dm {ds.spec.name} ") and r.precision == "fp32"
        )
        for mode in modes:
            left = args.budget_s - (time.perf_counter() - started)
            if left < TRIAL_RESERVE_S:
                skipped.append(
                    f"compile {dataset} {mode}: {left:.0f} s of --budget-s left (< {TRIAL_RESERVE_S:.0f})"
                )
                continue
            trials.append(compile_trial(ds, real, sizes, device, mode, eager))
    if not modes:
        skipped.append("compile trials: none asked for (--compile-modes)")
    dm = next(r for r in rows if r.what.startswith("dm ") and r.precision == "fp32")
    ev = next(r for r in rows if r.what.startswith("eval ") and r.precision == "fp32")
    command = " ".join(["python benchmarks/gpu.py", *sys.argv[1:]])
    out = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        # cuDNN runs fp32 convolutions in TF32 unless told otherwise; the project does not.
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "smoke": args.smoke,
        "sizes": dataclasses.asdict(sizes),
        "rows": [{**dataclasses.asdict(r), "tflops": r.tflops} for r in rows],
        "compile": trials,
        "skipped": skipped,
        "seconds_total": time.perf_counter() - started,
        "targets": [
            target("h200-dm256-ms", 1e3 * dm.seconds, 20.0, "<=", "ms", command),
            target("h200-eval-s", ev.seconds, 10.0, "<=", "s", command),
        ],
    }
    print(f"\n{name}, torch {torch.__version__}, {out['seconds_total']:.0f} s in all")
    print_table(rows, trials, skipped)
    default = (
        f"runs/gpu_smoke_{slug(name)}.json"
        if args.smoke
        else f"benchmarks/results/gpu_{slug(name)}.json"
    )
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
