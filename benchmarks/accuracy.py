"""Accuracy of distilled sets next to the published figures, at a stated compute budget.

For every (dataset, images per class, parameterization, storage, method) it distills with
the shared loop (fixed iterations and/or a time limit), evaluates by the DSA/DM protocol
(fresh ConvNets trained on the set only, mean ± std), and evaluates the random real
subset of the same bytes (the set the methods start from) in the same run. Images per class
count bytes: ``--storages fp16`` stores twice the values in the bytes of ``--ipc`` fp32
images per class, and every set is evaluated as its stored bytes give it back.
Prints a table with the published ConvNet figures (the seed review's Table 2)
and writes JSON.

    # the CPU target: MNIST, 10 images per class, DM, 15 minutes of distillation
    python benchmarks/accuracy.py --dataset mnist --ipc 10 --methods dm --minutes 15
    # multi-formation in fp16 beside fp32, at the same bytes
    python benchmarks/accuracy.py --dataset mnist --ipc 10 --methods dm --params pixels multi --storages fp32 fp16 --minutes 15
    # only fp16 multi-formation beside the reference (DM on fp32 pixels)
    python benchmarks/accuracy.py --dataset mnist --ipc 10 --methods dm --params pixels multi:fp16 --minutes 15
    # a full grid (needs a GPU for the published iteration counts)
    python benchmarks/accuracy.py --dataset cifar10 --ipc 1 10 50 --methods dm gm tm --iterations 20000
    # the same CIFAR-10 set trained on ResNet-18-BN and an MLP besides the ConvNet
    python benchmarks/accuracy.py --dataset cifar10 --ipc 10 --methods dm ncfm --minutes 60 --cross-models resnet18 mlp
    # private DM at epsilon 8 (any method option is a flag, given to the methods declaring it)
    python benchmarks/accuracy.py --dataset mnist --methods dm-dp --epsilon 8 --minutes 15
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import torch
from machine import machine

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import add_compile_flag, add_precision_flag, resolve_device
from fedcl_dd.data import Dataset, data_root, holdout, load_dataset
from fedcl_dd.distill import Callback, DistillResult, ProgressBar, TimeLimit
from fedcl_dd.evaluate import EvalResult, evaluate
from fedcl_dd.io import write_json
from fedcl_dd.pipeline import Distillation
from fedcl_dd.recipe import STORAGE_DTYPES, Recipe
from fedcl_dd.registry import (
    add_option_flags,
    get_objective,
    get_parameterization,
    options_from_args,
)
from fedcl_dd.sampling import ClassSampler
from fedcl_dd.synthetic import SyntheticSet, bytes_per_image

sys.path.insert(0, str(Path(__file__).parent))
from targets import target

# Published ConvNet accuracies (%) by paper, images per class 1 / 10 / 50; each objective
# names the paper it compares with (``Objective.paper``).
PUBLISHED = {
    "mnist": {
        "dc": (91.7, 97.4, 98.8),
        "dsa": (88.7, 97.9, 99.2),
        "dm": (89.9, 97.6, 98.6),
        "mtt": (91.4, 97.3, 98.5),
    },
    "cifar10": {
        "dc": (28.3, 44.9, 53.9),
        "dsa": (28.8, 53.2, 60.6),
        "dm": (26.5, 48.9, 63.0),
        "mtt": (46.3, 65.3, 71.6),
        # From the NCFM paper's Table 1 (NCFM's own figures are best test epochs).
        "idm": (45.6, 58.6, 67.5),
        "ncfm": (49.5, 71.8, 77.4),
    },
}


def published(dataset: str, method: str, ipc: int) -> float | None:
    col = {1: 0, 10: 1, 50: 2}.get(ipc)
    row = PUBLISHED.get(dataset, {}).get(get_objective(method).paper)
    return row[col] if (row and col is not None) else None


# The issues' accuracy targets, by (dataset, images per class).
ACCURACY_TARGETS = {("mnist", 10): 0.98, ("cifar10", 10): 0.60}


def validation_score(row: dict) -> float | None:
    """The validation accuracy of a row's chosen image learning rate (None: no --lr-grid)."""
    chosen = [s for s in row.get("lr_selection") or [] if s["lr_images"] == row["lr_images"]]
    return chosen[0]["validation"] if chosen else None


def is_reference(row: dict) -> bool:
    """DM on plain fp32 pixels with hard labels, the reference every other row's gain is
    measured against."""
    plain = (row["method"], row["param"], row.get("storage", "fp32")) == ("dm", "pixels", "fp32")
    return plain and not row.get("teacher_epochs")


def accuracy_targets(rows: list[dict], minutes: float | None, command: str) -> list[dict]:
    """Per row other than the reference (DM on plain fp32 pixels): its accuracy against the issue's
    target (where one is set) and its gain over the reference run in the same invocation (same
    dataset, images per class and seed), named with the row's method and parameterization.

    The issue's own names (``mnist-ipc10-15min-acc``, ``cifar10-ipc1-60min-gain-over-dm``)
    go to the row with the best validation accuracy of its cell, so that which row speaks
    for the project is chosen on the validation split, never on the test set; without
    ``--lr-grid`` there is no validation score and no such row."""
    if not minutes:
        return []
    out = []
    headline: dict[tuple, tuple[float, dict]] = {}
    for r in rows:
        if is_reference(r):
            continue
        cell = (r["dataset"], r["ipc"], r["seed"])
        stem = f"{r['dataset']}-ipc{r['ipc']}-{minutes:g}min"
        storage = r.get("storage", "fp32")
        which = "-".join(
            [r["method"]]
            + ([r["param"]] if r["param"] != "pixels" else [])
            + ([storage] if storage != "fp32" else [])
            + (["teacher"] if r.get("teacher_epochs") else [])
        )
        named = []
        goal = ACCURACY_TARGETS.get((r["dataset"], r["ipc"]))
        if goal is not None:
            named.append(("acc", r["accuracy_mean"], goal, ">="))
        dm = [d for d in rows if is_reference(d) and (d["dataset"], d["ipc"], d["seed"]) == cell]
        if dm:
            named.append(("gain-over-dm", r["accuracy_mean"] - dm[0]["accuracy_mean"], 0.0, ">"))
        out += [
            target(f"{stem}-{n}-{which}", v, g, op, "accuracy", command) for n, v, g, op in named
        ]
        score = validation_score(r)
        if score is not None and (cell not in headline or score > headline[cell][0]):
            headline[cell] = (score, {"stem": stem, "named": named})
    for _, best in headline.values():
        out += [
            target(f"{best['stem']}-{n}", v, g, op, "accuracy", command)
            for n, v, g, op in best["named"]
        ]
    return out


START_EVALS: dict[tuple[bytes, bytes], EvalResult] = {}
# One dataset load per process, whatever the number of cells it runs.
cached_dataset = functools.cache(load_dataset)


class Cell(NamedTuple):
    """One (images per class, parameterization, method, storage dtype, teacher epochs) of the
    table; ``ipc`` counts fp32 images of bytes per class, whatever the storage; ``teacher``
    > 0 labels the set by a teacher trained that many epochs (its labels' bytes and its
    seconds within the row's budget)."""

    ipc: int
    param: str
    method: str
    storage: str = "fp32"
    teacher: int = 0


def as_stored(syn: SyntheticSet) -> SyntheticSet:
    """The set as its stored bytes give it back (fp16 storage rounds the trained fp32 values),
    so a set is evaluated as it would be uploaded or saved."""
    return SyntheticSet.from_state(syn.state_tensors(), syn.metadata())


def given_lr(args: argparse.Namespace, method: str) -> float | None:
    """The image lr ``--lr-images`` gives ``method`` (its own entry, else the catch-all)."""
    return args.lr_images.get(method, args.lr_images.get("*"))


def distill(
    args: argparse.Namespace,
    ds: Dataset,
    cell: Cell,
    seed: int,
    device: torch.device,
    lr: float | None,
    minutes: float | None,
) -> tuple[Distillation, DistillResult, tuple[torch.Tensor, torch.Tensor]]:
    """One distillation of ``ds``'s training split: the run, its result and the set it started
    from (images, targets)."""
    ipc, param, method, storage, teacher = cell
    # The command line's method and parameterization options, each given where it is declared.
    declared = {o.name for o in get_objective(method).options}
    declared |= {o.name for o in get_parameterization(param).options}
    options = {k: v for k, v in options_from_args(args).items() if k in declared}
    recipe = Recipe(
        method=method,
        ipc=ipc,
        param=param,
        storage=storage,
        # The bytes of ipc fp32 images per class, so fp16 storage holds twice the values.
        budget_bytes=bytes_per_image(ds.spec.image_shape) * ipc * ds.spec.num_classes,
        iterations=args.iterations,
        lr_images=lr,
        options=options,
        teacher_epochs=teacher,
    )
    real = ClassSampler(ds.train_x, ds.train_y, ds.spec.num_classes, device)
    run = Distillation(
        recipe,
        real,
        ds.spec,
        seed=seed,
        device=device,
        cache_dir=data_root(args.data_root),
        compile=args.compile,
        precision=args.precision,
    )
    with torch.no_grad():
        first = as_stored(run.syn)
        start = (first.images().detach().clone(), first.targets().detach().clone())
    label = f"{args.dataset} {method} {param}{'' if storage == 'fp32' else ' ' + storage} ipc{ipc}"
    label += f" teacher {teacher} ep" if teacher else ""
    callbacks: list[Callback] = [ProgressBar(label)]
    if minutes:
        callbacks.append(TimeLimit(60 * minutes))
    return run, run.run(callbacks), start


def choose_lr(
    args: argparse.Namespace, val: Dataset, cell: Cell, device: torch.device
) -> tuple[float, list[dict]]:
    """The image learning rate among ``--lr-grid`` multiples of the method's own (or the given
    one), by the accuracy of one network on ``val``'s held-out split after
    ``--select-minutes`` of distillation of the rest; the grid with every score."""
    method = cell.method
    given = given_lr(args, method)
    base = given if given is not None else get_objective(method).default_lr(cell.ipc)
    grid = []
    for mult in args.lr_grid:
        run, result, _ = distill(
            args, val, cell, args.seeds[0], device, base * mult, args.select_minutes
        )
        ev = evaluate(
            as_stored(run.syn),
            val.test_x,
            val.test_y,
            val.spec,
            model=args.eval_model,
            num_models=1,
            epochs=args.eval_epochs,
            seed=args.seeds[0] + 1000,
            device=device,
            compile=args.compile,
            precision=args.precision,
        )
        grid.append(
            {"lr_images": base * mult, "iterations": result.iterations, "validation": ev.mean}
        )
        print(f"  select {cell} lr {base * mult:g}: validation {100 * ev.mean:.2f}%")
    best = max(grid, key=lambda g: g["validation"])  # ties: the first, i.e. the grid's order
    return best["lr_images"], grid


def run_one(
    args: argparse.Namespace,
    ds: Dataset,
    cell: Cell,
    seed: int,
    device: torch.device,
    selection: tuple[float, list[dict]] | None,
) -> dict:
    spec = ds.spec
    ipc, param, method, storage, teacher = cell
    lr = selection[0] if selection else given_lr(args, method)
    run, result, start = distill(args, ds, cell, seed, device, lr, args.minutes)
    syn = as_stored(run.syn)
    ev_kw = dict(
        model=args.eval_model,
        num_models=args.eval_models,
        epochs=args.eval_epochs,
        seed=seed + 1000,
        device=device,
        compile=args.compile,
        precision=args.precision,
    )
    saved = None
    if args.save_sets:
        tag = ("" if storage == "fp32" else f"-{storage}") + (
            f"-teacher{teacher}" if teacher else ""
        )
        name = f"{args.dataset}-{method}-{param}{tag}-ipc{ipc}-seed{seed}.safetensors"
        saved = str(syn.save(Path(args.save_sets) / name))
    t = time.perf_counter()
    ev = evaluate(syn, ds.test_x, ds.test_y, spec, **ev_kw)
    eval_seconds = time.perf_counter() - t
    # Methods that start from the same set (same seed and init) share its evaluation.
    key = (start[0].numpy().tobytes(), start[1].numpy().tobytes())
    if key not in START_EVALS:
        START_EVALS[key] = evaluate(start, ds.test_x, ds.test_y, spec, **ev_kw)
    base = START_EVALS[key]
    # Cross-architecture: the same set (and the same random real subset) trained on other models.
    cross = {}
    for name in args.cross_models:
        kw = {**ev_kw, "model": name}
        on_set = evaluate(syn, ds.test_x, ds.test_y, spec, **kw)
        on_start = evaluate(start, ds.test_x, ds.test_y, spec, **kw)
        cross[name] = {
            "accuracy_mean": on_set.mean,
            "accuracy_std": on_set.std,
            "start_accuracy_mean": on_start.mean,
            "start_accuracy_std": on_start.std,
        }
    return {
        "dataset": args.dataset,
        "method": method,
        "ipc": ipc,
        "param": param,
        "storage": storage,
        "teacher_epochs": teacher,
        "seed": seed,
        "iterations": result.iterations,
        "distill_seconds": result.seconds,
        "seconds_per_iteration": result.seconds / max(1, result.iterations),
        "options": run.recipe.options,
        "lr_images": run.recipe.lr,
        "lr_selection": selection[1] if selection else None,
        "accuracy_mean": ev.mean,
        "accuracy_std": ev.std,
        "accuracies": ev.accuracies,
        "start_accuracy_mean": base.mean,
        "start_accuracy_std": base.std,
        "eval_seconds": eval_seconds,
        "nbytes": syn.nbytes,
        "num_images": syn.num_images,
        "published": published(args.dataset, method, ipc),
        "cross_architecture": cross,
        "saved": saved,
        **result.report,
    }


def cell_rows(args: argparse.Namespace, cell: Cell) -> list[dict]:
    """The rows of one (images per class, parameterization, method): its image lr chosen on a
    held-out share of the training set (with ``--lr-grid``; the test split is never seen
    there), then one run per seed."""
    device = resolve_device(args.device)
    ds = cached_dataset(args.dataset, args.data_root)
    val = holdout(ds, args.val_fraction, seed=0) if args.lr_grid else None
    selection = choose_lr(args, val, cell, device) if val else None
    return [run_one(args, ds, cell, s, device, selection) for s in args.seeds]


def param_storages(params: list[str], storages: list[str]) -> list[tuple[str, str]]:
    """The (parameterization, storage dtype) pairs to run: each ``PARAM`` with every one of
    ``storages``, each ``PARAM:STORAGE`` with that one only; ``ValueError`` naming a bad item."""
    pairs = []
    for item in params:
        param, sep, storage = item.partition(":")
        if sep and storage not in STORAGE_DTYPES:
            raise ValueError(
                f"--params {item!r}: storage {storage!r} is not one of {sorted(STORAGE_DTYPES)} "
                f"(e.g. {param}:fp16)"
            )
        pairs += [(param, s) for s in ([storage] if sep else storages)]
    return list(dict.fromkeys(pairs))


def make_cells(
    ipcs: list[int], pairs: list[tuple[str, str]], methods: list[str], teacher_epochs: int
) -> list[Cell]:
    """Every (images per class, parameterization and storage, method), in the table's order;
    each labelled by a teacher of ``teacher_epochs`` but the reference, which stays plain DM."""
    cells = []
    for ipc in ipcs:
        for param, storage in pairs:
            for m in methods:
                plain = is_reference({"method": m, "param": param, "storage": storage})
                cells.append(Cell(ipc, param, m, storage, 0 if plain else teacher_epochs))
    return cells


def _start_worker(threads: int) -> None:
    """A ``--jobs`` process: its share of the cores, and freed memory kept (a spawned process
    starts with glibc's defaults, not its parent's)."""
    torch.set_num_threads(threads)
    keep_freed_memory()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--ipc", type=int, nargs="+", default=[10])
    p.add_argument("--methods", nargs="+", default=["dm"])
    p.add_argument(
        "--params",
        nargs="+",
        default=["pixels"],
        help="parameterizations, each run with every method (e.g. pixels multi); PARAM:STORAGE "
        "runs that one at that storage dtype only (e.g. pixels multi:fp16)",
    )
    p.add_argument(
        "--storages",
        nargs="+",
        default=["fp32"],
        choices=sorted(STORAGE_DTYPES),
        help="storage dtypes, each run with every parameterization and method, at the bytes of "
        "--ipc fp32 images per class (fp16 stores twice the values; evaluated as stored)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=0,
        metavar="N",
        help="label every set but the reference (DM on fp32 pixels, hard labels) by a teacher "
        "trained N epochs on the real data first, within the row's minutes and bytes",
    )
    p.add_argument(
        "--iterations", type=int, default=20000, help="upper bound; --minutes may stop earlier"
    )
    p.add_argument("--minutes", type=float, default=None, help="distillation time limit per run")
    p.add_argument(
        "--lr-images",
        nargs="+",
        default=[],
        metavar="[METHOD=]LR",
        help="image learning rate for every method, or per method (e.g. dm=10 ncfm=0.01); "
        "default: each method's own",
    )
    p.add_argument(
        "--lr-grid",
        type=float,
        nargs="*",
        default=[],
        metavar="MULT",
        help="choose each run's image lr among these multiples of its own (or --lr-images') on a "
        "validation split of the training set (one network, --select-minutes); default: no choice",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of each class held out (--lr-grid)"
    )
    p.add_argument("--select-minutes", type=float, default=3.0, help="distillation per grid point")
    p.add_argument("--eval-model", default="convnet")
    p.add_argument("--eval-models", type=int, default=3)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument(
        "--cross-models",
        nargs="*",
        default=[],
        metavar="MODEL",
        help="also train these models on each set and on its random real start (e.g. resnet18 "
        "mlp: the survey's ResNet-18-BN and MLP), as many as --eval-models, --eval-epochs",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--device", default="auto")
    add_compile_flag(
        p,
        "torch.compile the matching and evaluation networks of every run alike (MODE "
        "default: 'default'); each process compiles once",
    )
    add_precision_flag(p)
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each (CPU)")
    p.add_argument("--json", default="benchmarks/results/accuracy.json")
    p.add_argument(
        "--save-sets",
        default=None,
        metavar="DIR",
        help="save every distilled set (as stored) to DIR, e.g. for a later `fedcl-dd evaluate --eval-model`",
    )
    add_option_flags(p)
    args = p.parse_args()
    keep_freed_memory()
    args.lr_images = dict(
        (m, float(v)) if v else ("*", float(m))
        for m, _, v in map(lambda e: e.partition("="), args.lr_images)
    )
    device = resolve_device(args.device)
    try:
        pairs = param_storages(args.params, args.storages)
    except ValueError as err:
        p.error(str(err))
    cells = make_cells(args.ipc, pairs, args.methods, args.teacher_epochs)
    # With --jobs, each run gets its share of the cores for all of its minutes, so that a
    # run left alone does not speed up when its neighbour finishes.
    threads = max(1, torch.get_num_threads() // args.jobs)
    budget = (
        (f"{args.minutes} min" if args.minutes else f"{args.iterations} it")
        + f" of distillation, options {options_from_args(args) or 'default'}; eval {args.eval_models}x {args.eval_model}, "
        f"{args.eval_epochs} epochs; device {device}, {threads} threads"
        + (f" in each of {args.jobs} processes" if args.jobs > 1 else "")
        + (f", compiled ({args.compile})" if args.compile else "")
        + (f", {args.precision}" if args.precision != "fp32" else "")
        + (
            f"; image lr chosen among {args.lr_grid} x the method's on {args.val_fraction} of "
            f"the training set held out, {args.select_minutes} min of distillation each"
            if args.lr_grid
            else ""
        )
    )
    out = Path(args.json)
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    done: dict[Cell, list[dict]] = {}

    def write(complete: bool) -> list[dict]:
        """The JSON with every cell finished so far, in the table's order: a run stopped part
        way keeps its finished rows (``"complete": false``)."""
        rows = [r for c in cells if c in done for r in done[c]]
        targets = accuracy_targets(rows, args.minutes, command)
        # Atomic: a run killed while writing leaves the last complete file.
        write_json(
            {
                "machine": machine(),
                "budget": budget,
                "complete": complete,
                "rows": rows,
                "targets": targets,
            },
            out,
        )
        return rows

    if args.jobs > 1:
        # Separate processes: on a small CPU two runs side by side finish sooner than one
        # after the other, under the same load.
        with ProcessPoolExecutor(
            args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads,),
        ) as ex:
            futures = {ex.submit(cell_rows, args, c): c for c in cells}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                write(complete=False)
    else:
        for c in cells:
            done[c] = cell_rows(args, c)
            write(complete=False)
    rows = write(complete=True)

    print(f"\n{args.dataset}; budget: {budget}")
    head = (
        f"{'method':7} {'param':10} {'ipc':>4} {'iters':>6} {'s/it':>6} {'ours %':>13} {'start (real) %':>15} "
        f"{'published %':>11} {'bytes':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        pub = f"{r['published']:.1f}" if r["published"] is not None else "-"
        print(
            f"{r['method']:7} {r['param'] + ('' if r['storage'] == 'fp32' else '/' + r['storage']) + ('+T' if r.get('teacher_epochs') else ''):10} {r['ipc']:4d} {r['iterations']:6d} {r['seconds_per_iteration']:6.2f} "
            f"{100 * r['accuracy_mean']:6.2f} ± {100 * r['accuracy_std']:4.2f} "
            f"{100 * r['start_accuracy_mean']:7.2f} ± {100 * r['start_accuracy_std']:4.2f} {pub:>11} {r['nbytes']:9d}"
        )
        for name, c in r["cross_architecture"].items():
            print(
                f"  on {name:<10} {100 * c['accuracy_mean']:6.2f} ± {100 * c['accuracy_std']:4.2f} "
                f"{100 * c['start_accuracy_mean']:7.2f} ± {100 * c['start_accuracy_std']:4.2f}"
            )
    for t in accuracy_targets(rows, args.minutes, command):
        print(f"target {t['name']}: {t['value']:.4f} ({t['op']} {t['target']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
