"""``fedcl-dd continual``: one class-incremental run with one of our byte-bounded memories or a baseline memory.

Avalanche is imported inside the handler, so ``fedcl-dd --help`` works without the
``avalanche`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``continual`` to ``fedcl-dd``."""
    from fedcl_dd.cli import positive_int

    c = sub.add_parser(
        "continual",
        help="class-incremental run with a byte-bounded (or baseline) replay memory (needs the avalanche extra)",
        description="Run a class-incremental stream with a replay memory of fixed bytes and print "
        "accuracy after each experience, forgetting, buffer bytes and distillation seconds.",
    )
    c.add_argument(
        "--benchmark",
        default="split-mnist",
        choices=("split-digits", "split-mnist", "split-cifar10"),
    )
    c.add_argument(
        "--buffer",
        default="pixels",
        choices=(
            "pixels",
            "multi",
            "addressing",
            "replay",
            "class-balanced",
            "herding",
            "gdumb",
            "er-ace",
            "der",
            "compressed-real",
        ),
    )
    budget = c.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-bytes", type=positive_int, default=None, help="memory budget in bytes"
    )
    budget.add_argument(
        "--budget-images",
        type=positive_int,
        default=100,
        help="budget as the bytes of N labelled fp32 images (default 100)",
    )
    c.add_argument(
        "--seed", type=int, default=0, help="class order, model init, distillation draws"
    )
    c.add_argument(
        "--strategy",
        default="naive",
        choices=("naive", "ewc", "er-ace"),
        help="the learner around the memory: er-ace trains with ER-ACE's asymmetric loss, "
        "replaying the chosen buffer (--buffer er-ace and der are strategies themselves: naive "
        "only)",
    )
    c.add_argument("--ewc-lambda", type=float, default=0.4)
    c.add_argument(
        "--model",
        default="mlp",
        help="learner: mlp, convnet, ..., or slim-resnet18 (Avalanche's SlimResNet18, "
        "split-cifar10 only); herding needs mlp",
    )
    c.add_argument("--epochs", type=positive_int, default=1, help="epochs over each experience")
    c.add_argument("--lr", type=float, default=0.01)
    c.add_argument(
        "--train-mb-size", type=positive_int, default=32, help="new samples per minibatch"
    )
    c.add_argument(
        "--batch-size-mem", type=positive_int, default=None, help="memory samples per minibatch"
    )
    c.add_argument(
        "--fresh",
        action="store_true",
        help="our memory buffers: train a fresh model on the buffer alone after each experience",
    )
    c.add_argument(
        "--buffer-epochs",
        type=positive_int,
        default=50,
        help="epochs on the buffer (--fresh, gdumb)",
    )
    from fedcl_dd.registry import OBJECTIVES

    rehearsal = sorted(name for name, cls in OBJECTIVES.items() if not cls.private)
    c.add_argument("--method", default="dm", choices=rehearsal, help="distillation objective")
    c.add_argument(
        "--iterations", type=int, default=None, help="distillation iterations per experience"
    )
    c.add_argument(
        "--lr-images",
        type=float,
        default=None,
        help="learning rate of the memory's images (default: the method's)",
    )
    c.add_argument(
        "--build-over-train",
        type=float,
        default=None,
        metavar="R",
        help="cap each memory update at R times the experience's training time (matching stops "
        "at the first iteration past it; default: no cap)",
    )
    c.add_argument(
        "--real-per-class",
        type=positive_int,
        default=None,
        help="real images per class and iteration",
    )
    c.add_argument(
        "--downsample",
        type=positive_int,
        default=None,
        help="addressing bases at 1/N resolution (default 2; 1 below 16 pixels)",
    )
    c.add_argument(
        "--bases",
        type=positive_int,
        default=None,
        help="addressing bases (default: from the budget)",
    )
    c.add_argument(
        "--factor",
        type=positive_int,
        default=None,
        help="multi, compressed-real: N^2 images at 1/N resolution per stored image (default 2)",
    )
    c.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the method or parameterization (e.g. syn-per-class=32), repeatable",
    )
    c.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="bf16: the memory's distillation and the fresh-model training under bfloat16 autocast",
    )
    c.add_argument(
        "--storage",
        default="fp32",
        choices=("fp32", "fp16"),
        help="dtype of our memories' stored tensors (compressed-real: fp16 holds twice the images)",
    )
    c.add_argument("--out", default=None, help="output folder (default runs/continual-...)")
    c.add_argument(
        "--checkpoint", action="store_true", help="save after each experience; resume if present"
    )
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(handler=_run)


def parse_options(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as options by name (hyphens to underscores); the memory's recipe
    parses each value against its declaration."""
    from fedcl_dd.cli import parse_settings

    return {k.replace("-", "_"): v for k, v in parse_settings(items, "--option").items()}


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fedcl_dd.cli import resolve_device
    from fedcl_dd.io import write_json
    from fedcl_dd.viz import save_grid

    from .buffers import MemoryBuffer
    from .checkpoint import memories
    from .runner import RunConfig, RunResult, default_out, run_stream

    overrides = {
        "batch_size_mem": args.batch_size_mem,
        "iterations": args.iterations,
        "lr_images": args.lr_images,
        "real_per_class": args.real_per_class,
        "downsample": args.downsample,
        "bases": args.bases,
        "factor": args.factor,
        "build_over_train": args.build_over_train,
    }
    cfg = RunConfig(
        options=parse_options(args.option),
        precision=args.precision,
        benchmark=args.benchmark,
        buffer=args.buffer,
        budget_bytes=args.budget_bytes,
        budget_images=args.budget_images,
        seed=args.seed,
        strategy=args.strategy,
        ewc_lambda=args.ewc_lambda,
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        train_mb_size=args.train_mb_size,
        fresh=args.fresh,
        buffer_epochs=args.buffer_epochs,
        method=args.method,
        storage=args.storage,
        data_root=args.data_root,
        device=str(resolve_device(args.device)),
        progress=not args.no_progress,
    )
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out) if args.out else default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)

    def report(i: int, result: RunResult, strategy: Any) -> None:
        print(
            f"experience {i}: accuracy {result.accuracy_after[-1]:.4f}  forgetting {result.forgetting:.4f}  "
            f"buffer {result.buffer_bytes} B / {cfg.budget} B, {result.distinct_samples} distinct samples  "
            f"train {result.train_seconds[-1]:.1f} s  build {result.build_seconds[-1]:.1f} s"
            + (
                f" ({result.iterations_per_update[-1]} matching iterations)"
                if result.iterations_per_update
                else ""
            ),
            flush=True,
        )
        memory = memories(strategy)[0]
        if isinstance(memory, MemoryBuffer) and memory.syn is not None:
            save_grid(memory.syn, out / "buffer.png")

    result = run_stream(
        cfg, on_experience=report, checkpoint=out / "checkpoint.pkl" if args.checkpoint else None
    )
    write_json(result.as_dict(), out / "result.json")
    print(f"final average accuracy {result.final_accuracy:.4f}; results in {out}")
    return 0
