"""The ``fedcl-dd`` command line: ``distill``, ``evaluate`` and ``data import``.

Adapters add their own subcommands (``simulate`` for Flower, ``continual`` for
Avalanche) through the ``fedcl_dd.commands`` entry-point group, so the core never
imports a framework: each entry point is a ``register(subparsers)`` function that adds
a parser and sets ``handler`` (a function of the parsed arguments returning the exit
status) as its default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .compiled import COMPILE_MODES
from .data import SPECS, DatasetNotFoundError, data_root, import_data, load_dataset
from .distill import (
    Callback,
    Checkpointer,
    DistillationDiverged,
    PeriodicEvaluation,
    ProgressBar,
    TimeLimit,
)
from .evaluate import evaluate
from .io import write_json
from .models import MODELS
from .parameterizations import INITS
from .pipeline import Distillation
from .precision import PRECISIONS
from .recipe import STORAGE_DTYPES, Recipe
from .registry import OBJECTIVES, PARAMETERIZATIONS, add_option_flags, options_from_args
from .sampling import ClassSampler
from .synthetic import InvalidSyntheticSet, SyntheticSet
from .viz import save_grid

__all__ = ["COMMANDS_GROUP", "main", "positive_int", "resolve_device"]

COMMANDS_GROUP = "fedcl_dd.commands"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_compile_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--compile [MODE]``: a :data:`~fedcl_dd.compiled.COMPILE_MODES` mode, ``default``
    when given bare, None (eager) when absent."""
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help=help,
    )


def add_precision_flag(p: argparse.ArgumentParser) -> None:
    """``--precision {fp32,bf16}``, fp32 by default."""
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="bf16: bfloat16 autocast for distilling and training where the device computes it "
        "natively (else fp32, with a warning)",
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def split_setting(
    item: str, flag: str = "--set", own_flags: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """One ``KEY=VALUE`` command-line item as ``(key, value)``. ``ValueError`` naming the item
    and the fix for an item without ``=`` or a key, and for a key in ``own_flags`` (key: the
    flag to use instead), so that ``--set rounds=3`` cannot silently override ``--rounds 5``.
    ``KEY`` may carry a ``STRATEGY:`` scope; the caller splits it off."""
    key, sep, value = item.partition("=")
    bare = key.rpartition(":")[2]
    if not sep or not bare:
        raise ValueError(f"{flag} {item!r}: write KEY=VALUE")
    if own_flags and bare in own_flags:
        raise ValueError(f"{flag} {item!r}: {bare} has its own flag; use {own_flags[bare]}")
    return key, value


def parse_settings(
    items: list[str], flag: str = "--set", own_flags: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``KEY=VALUE`` items (:func:`split_setting`) as ``{key: value}``, a later item winning."""
    return dict(split_setting(item, flag, own_flags) for item in items)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-model", default="convnet", choices=sorted(MODELS))
    p.add_argument(
        "--eval-epochs", type=positive_int, default=300, help="epochs per evaluated network"
    )
    p.add_argument("--eval-models", type=positive_int, default=3, help="networks to average over")
    add_precision_flag(p)
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (the expected time is said)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcl-dd", description=__doc__)
    parser.add_argument(
        "--data-root",
        default=None,
        help="data folder (default: $FEDCL_DD_DATA or ~/.cache/fedcl-dd)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distill a dataset into a synthetic set")
    d.add_argument("--dataset", required=True, choices=sorted(SPECS))
    d.add_argument("--method", default="dm", choices=sorted(OBJECTIVES))
    d.add_argument("--ipc", type=int, default=10, help="budget in labelled images per class")
    d.add_argument("--param", default="pixels", choices=sorted(PARAMETERIZATIONS))
    d.add_argument("--budget-bytes", type=int, default=None, help="byte budget (overrides --ipc)")
    d.add_argument("--storage", default="fp32", choices=sorted(STORAGE_DTYPES))
    d.add_argument("--iterations", type=int, default=1000)
    d.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this long of distilling (a teacher, which trains first, included)",
    )
    d.add_argument(
        "--lr-images", type=float, default=None, help="default: the method's published value"
    )
    d.add_argument("--momentum", type=float, default=None, help="default: the method's")
    d.add_argument(
        "--init", default=None, choices=INITS, help="default: the method's (noise for private ones)"
    )
    d.add_argument("--soft-labels", action="store_true", help="learn labels too")
    d.add_argument(
        "--teacher-epochs",
        type=int,
        default=0,
        help="label the set by a network trained on the real data for N epochs (soft labels, "
        "counted in the bytes; 0: off)",
    )
    d.add_argument(
        "--model", default="convnet", choices=sorted(MODELS), help="network to distill with"
    )
    d.add_argument("--no-augment", action="store_true", help="distill without DSA")
    add_compile_flag(
        d,
        "torch.compile the matching networks' embeddings (distribution-matching methods) "
        "and the evaluation networks' (MODE default: 'default'). Each compiles once (~30-45 s "
        "on a 2-core CPU), then runs ~1.3x faster there: it pays in runs of a few hundred "
        "iterations",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--out", default=None, help="output folder (default runs/<dataset>-<method>-...)"
    )
    d.add_argument("--checkpoint-every", type=int, default=100)
    d.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    d.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N iterations (watching only)"
    )
    add_option_flags(d)
    _add_eval_args(d)

    e = sub.add_parser("evaluate", help="evaluate a saved synthetic set")
    e.add_argument("file")
    e.add_argument("--dataset", required=True, choices=sorted(SPECS))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, help="also write the result here")
    _add_eval_args(e)

    data = sub.add_parser("data", help="manage the data root")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    imp = data_sub.add_parser(
        "import", help="fill the data root from a folder laid out like shared/data"
    )
    imp.add_argument("path")
    for ep in entry_points(group=COMMANDS_GROUP):
        ep.load()(sub)
    return parser


def _cmd_distill(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    recipe = Recipe(
        method=args.method,
        param=args.param,
        ipc=args.ipc,
        budget_bytes=args.budget_bytes,
        storage=args.storage,
        iterations=args.iterations,
        lr_images=args.lr_images,
        momentum=args.momentum,
        init=args.init,
        soft_labels=args.soft_labels,
        teacher_epochs=args.teacher_epochs,
        options=options_from_args(args),
    )
    out = Path(
        args.out or f"runs/{args.dataset}-{args.method}-{args.param}-ipc{args.ipc}-seed{args.seed}"
    )
    checkpoint = out / "checkpoint.pt"
    if args.resume and not checkpoint.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint at {checkpoint}; run without --resume to start"
        )
    ds = load_dataset(args.dataset, args.data_root)
    spec = ds.spec
    real = ClassSampler(ds.train_x, ds.train_y, spec.num_classes, device)
    # Costly artifacts (expert trajectories) are cached beside the data, keyed by what defines them.
    run = Distillation(
        recipe,
        real,
        spec,
        seed=args.seed,
        augment=not args.no_augment,
        model=args.model,
        cache_dir=data_root(args.data_root),
        info={"seed": args.seed},
        precision=args.precision,
        compile=args.compile,
    )
    syn = run.syn

    def watch(s: SyntheticSet) -> dict[str, float]:
        r = evaluate(
            s,
            ds.test_x,
            ds.test_y,
            spec,
            args.eval_model,
            1,
            args.eval_epochs,
            seed=args.seed,
            precision=args.precision,
            compile=args.compile,
        )
        return {"test_accuracy_1net": r.mean}

    callbacks: list[Callback] = [
        Checkpointer(checkpoint, args.checkpoint_every, resume=args.resume)
    ]
    callbacks.append(ProgressBar(f"{args.method}/{args.param}", disable=args.no_progress or None))
    if args.eval_every > 0:
        callbacks.append(PeriodicEvaluation(args.eval_every, watch))
    if args.max_minutes is not None:
        callbacks.append(TimeLimit(60 * args.max_minutes))
    budget = recipe.budget_for(spec, len(syn.classes))
    print(
        f"distilling {args.dataset} with {args.method} into {syn.num_images} {args.param} images "
        f"({syn.nbytes} bytes, budget {budget}) on {device}",
        file=sys.stderr,
    )
    result = run.run(callbacks)
    syn.save(out / "synthetic.safetensors")
    save_grid(syn, out / "grid.png")
    ev = evaluate(
        syn,
        ds.test_x,
        ds.test_y,
        spec,
        args.eval_model,
        args.eval_models,
        args.eval_epochs,
        seed=args.seed + 1000,
        device=device,
        precision=args.precision,
        compile=args.compile,
        progress=True,
        bar=False if args.no_progress else None,
    )
    results = {
        "dataset": args.dataset,
        "method": args.method,
        "param": args.param,
        "ipc": args.ipc,
        "storage": args.storage,
        "precision": args.precision,
        "compile": args.compile,
        "budget_bytes": budget,
        "nbytes": syn.nbytes,
        "num_images": syn.num_images,
        "iterations": result.iterations,
        "lr_images": recipe.lr,
        "distill_seconds": result.seconds,
        "seconds_per_iteration": result.seconds / max(1, result.iterations),
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "accuracy_mean": ev.mean,
        "accuracy_std": ev.std,
        "accuracies": ev.accuracies,
        "eval_model": ev.model,
        "eval_epochs": ev.epochs,
        "eval_seconds": ev.seconds,
        "metrics": result.metrics,
        **result.report,
    }
    write_json(results, out / "results.json")
    print(f"accuracy {ev}; wrote {out}/synthetic.safetensors, results.json, grid.png")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    syn = SyntheticSet.load(args.file).to(device)
    spec = SPECS[args.dataset]
    if syn.image_shape != spec.image_shape or syn.num_classes != spec.num_classes:
        raise InvalidSyntheticSet(
            f"{args.file} holds {syn.num_classes}-class {syn.image_shape} images, "
            f"but {args.dataset} has {spec.num_classes} classes of {spec.image_shape}"
        )
    ds = load_dataset(args.dataset, args.data_root)
    ev = evaluate(
        syn,
        ds.test_x,
        ds.test_y,
        ds.spec,
        args.eval_model,
        args.eval_models,
        args.eval_epochs,
        seed=args.seed,
        device=device,
        precision=args.precision,
        progress=True,
        bar=False if args.no_progress else None,
    )
    print(f"{args.file}: {ev}")
    if args.json:
        write_json(
            {
                "file": args.file,
                "accuracy_mean": ev.mean,
                "accuracy_std": ev.std,
                "accuracies": ev.accuracies,
                "eval_model": ev.model,
                "eval_epochs": ev.epochs,
                "precision": args.precision,
                "nbytes": syn.nbytes,
                "num_images": syn.num_images,
            },
            Path(args.json),
        )
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    written = import_data(args.path, args.data_root)
    print(
        f"imported {len(written)} files into the data root"
        + ("" if written else " (already complete)")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcl-dd`` command; returns the exit status."""
    keep_freed_memory()
    args = _parser().parse_args(argv)
    handlers = {"distill": _cmd_distill, "evaluate": _cmd_evaluate, "data": _cmd_data}
    try:
        return handlers[args.command](args) if args.command in handlers else args.handler(args)
    except (ValueError, FileNotFoundError, DatasetNotFoundError, DistillationDiverged) as exc:
        # Expected problems get one clear line, not a traceback.
        print(f"fedcl-dd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
