"""Poisoned uploads against the server's screen (``FedConfig.screen``, :mod:`fedcl_dd.screen`).

Four runs of our synthetic-set strategy on one preset, the same seed and settings:
clean and poisoned, each with the screen off and on. In the poisoned runs the first
``--attackers`` partitions replace their honest upload, every round, by one of

* ``permuted``: the same images, each label moved to the next class;
* ``scaled``: the same images times 10 (within the server's pixel bound);
* ``noise``: Gaussian noise images with the honest labels.

Reported: final test accuracy of each run, the accuracy drop of the screened poisoned run
against the clean run without a screen (target: within 1 point), the share of honest
uploads the screen refused (false rejections, from the clean screened run) and the share
of poisoned uploads it let through, with wall seconds.

    python benchmarks/poisoning.py --preset mnist-dir0.5-10 --rounds 2 --attack permuted
    python benchmarks/poisoning.py --preset digits-dir0.5-10 --rounds 3 --attack all
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import torch
from fedcl_dd.strategies.flower import client_app as honest
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.payload import METRICS, SYNTHETIC, SYNTHETIC_META, synthetic_records
from fedcl_dd.strategies.flower.report import plot_runs
from fedcl_dd.strategies.flower.simulation import simulate
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from machine import machine
from targets import target

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import parse_settings
from fedcl_dd.io import write_json
from fedcl_dd.screen import DEFAULT_SCREEN_THRESHOLD
from fedcl_dd.synthetic import PixelSet, SyntheticSet

ATTACKS = ("permuted", "scaled", "noise")

# Ray workers cannot import this script: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def poisoned(syn: SyntheticSet, kind: str, seed: int) -> PixelSet:
    """An honest set turned into the ``kind`` of attack (see the module)."""
    with torch.no_grad():
        x, y = syn.images().detach().clone(), syn.targets().clone()
    if kind == "permuted":
        y = (y + 1) % syn.num_classes
    elif kind == "scaled":
        x = x * 10
    elif kind == "noise":
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * x.std()
    else:
        raise ValueError(f"unknown attack {kind!r}; use one of {ATTACKS}")
    return PixelSet(x, y, syn.num_classes)


def attacking_app(attackers: int, kind: str) -> ClientApp:
    """Our ClientApp, except that partitions below ``attackers`` upload a ``kind`` attack."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest.train(msg, context)
        pid = int(context.node_config["partition-id"])
        if pid >= attackers:
            return reply
        content = reply.content
        tensors = content[SYNTHETIC].to_torch_state_dict()
        meta = {k: str(v) for k, v in content[SYNTHETIC_META].items()}
        syn = SyntheticSet.from_state(dict(tensors), meta)
        metrics = {k: float(v) for k, v in content[METRICS].items()}
        round_ = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        bad = poisoned(syn, kind, seed=1000 * round_ + pid)
        return Message(synthetic_records(bad, metrics), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest.evaluate(msg, context)

    return app


def run(cfg: FedConfig, out: Path, app: ClientApp | None, data_root: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    results = simulate(cfg, out, data_root=data_root, client_app=app)
    results["seconds"] = time.perf_counter() - start
    return results


def refused_share(rounds: list[dict[str, Any]], partitions: set[int]) -> float:
    """Share of the uploads of ``partitions`` the screen refused, over all rounds."""
    refused = total = 0
    for row in rounds:
        if row["round"] == 0:
            continue
        screened = {r.get("partition") for r in row["rejected"] if "screened out" in r["reason"]}
        mine_accepted = [p for p in row["accepted"] if p in partitions]
        mine_refused = [p for p in screened if p in partitions]
        refused += len(mine_refused)
        total += len(mine_accepted) + len(mine_refused)
    return refused / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="digits-dir0.5-10")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attackers", type=int, default=2)
    p.add_argument("--attack", default="permuted", choices=[*ATTACKS, "all"])
    p.add_argument("--screen", type=float, default=DEFAULT_SCREEN_THRESHOLD)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="shared FedConfig settings"
    )
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="benchmarks/results/poisoning")
    args = p.parse_args(argv)
    keep_freed_memory()

    own_flags = {"preset": "--preset", "rounds": "--rounds", "screen": "--screen"}
    try:
        settings = parse_settings(args.set, own_flags=own_flags)
    except ValueError as err:
        p.error(str(err))
    values: dict[str, Any] = {**settings, "preset": args.preset, "rounds": args.rounds}
    base = FedConfig.from_mapping(values)
    clients = base.preset_obj.num_clients
    if not 0 < args.attackers < clients / 2:
        raise SystemExit(
            f"--attackers must be a minority of the {clients} clients, got {args.attackers}"
        )
    out = Path(args.out) / args.preset
    runs: dict[str, dict[str, Any]] = {}
    for screen in (0.0, args.screen):
        name = f"clean-screen{screen:g}"
        runs[name] = run(base.replace(screen=screen), out / name, None, args.data_root)
    attacks = list(ATTACKS) if args.attack == "all" else [args.attack]
    for kind in attacks:
        for screen in (0.0, args.screen):
            name = f"{kind}-screen{screen:g}"
            app = attacking_app(args.attackers, kind)
            runs[name] = run(base.replace(screen=screen), out / name, app, args.data_root)

    honest_ids = set(range(args.attackers, clients))
    attackers = set(range(args.attackers))
    clean = runs["clean-screen0"]["rounds"][-1]["accuracy"]
    rows = []
    for name, res in runs.items():
        final = res["rounds"][-1]
        rows.append(
            {
                "run": name,
                "final_accuracy": final["accuracy"],
                "drop_vs_clean": clean - final["accuracy"],
                "honest_refused": refused_share(res["rounds"], honest_ids),
                "poisoned_admitted": 1 - refused_share(res["rounds"], attackers)
                if not name.startswith("clean")
                else None,
                "seconds": res["seconds"],
            }
        )
    print(
        f"{'run':<22}{'final acc':>10}{'drop':>8}{'honest refused':>16}{'poison let in':>15}{'s':>7}"
    )
    for r in rows:
        let_in = "-" if r["poisoned_admitted"] is None else f"{r['poisoned_admitted']:.2f}"
        print(
            f"{r['run']:<22}{r['final_accuracy']:>10.4f}{r['drop_vs_clean']:>8.4f}"
            f"{r['honest_refused']:>16.2f}{let_in:>15}{r['seconds']:>7.0f}"
        )
    command = "python benchmarks/poisoning.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    setting = args.preset.rsplit("-", 1)[0]
    screened = [r for r in rows if r["run"].endswith(f"screen{args.screen:g}")]
    targets = [
        target(
            "poison-2of10-acc-drop" if setting == "mnist-dir0.5" else f"{setting}-poison-acc-drop",
            max(r["drop_vs_clean"] for r in screened if not r["run"].startswith("clean")),
            0.01,
            "<=",
            "accuracy",
            command,
        ),
        target(
            f"{setting}-screen-false-rejections",
            next(r["honest_refused"] for r in screened if r["run"].startswith("clean")),
            0.0,
            "<=",
            "share",
            command,
        ),
    ]
    write_json(
        {
            "machine": machine(),
            "preset": args.preset,
            "attackers": args.attackers,
            "screen": args.screen,
            "config": base.to_dict(),
            "summary": rows,
            "targets": targets,
            "rounds": {name: res["rounds"] for name, res in runs.items()},
        },
        out / "summary.json",
    )
    plot_runs(
        {name: res["rounds"] for name, res in runs.items()},
        out / "accuracy.png",
        title=f"{args.preset}: {args.attackers} poisoning clients",
    )
    print(f"wrote {out}/summary.json and {out}/accuracy.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
