"""``fedcl-dd simulate``: a federated run on Flower's Ray simulation backend.

The same ServerApp and ClientApp as ``flwr run .``, configured from flags instead of the
run config. ``--strategy`` picks our synthetic-set strategy or Flower's FedAvg / FedProx / FedAvgM.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fedcl_dd.recipe import STORAGE_DTYPES
from fedcl_dd.registry import OBJECTIVES, PARAMETERIZATIONS, get_objective

from .config import ALGORITHMS  # Flower-free, as this module must stay (`fedcl-dd --help`)

if TYPE_CHECKING:  # imported where used: `fedcl-dd --help` should not load Flower
    from .config import FedConfig

__all__ = ["register", "simulate"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` to the ``fedcl-dd`` command."""
    p = sub.add_parser("simulate", help="simulate federated rounds on Flower (Ray backend)")
    p.add_argument(
        "--preset", default="digits-iid-4", help="<dataset>-<iid|dir<alpha>|path<k>>-<clients>"
    )
    p.add_argument(
        "--strategy",
        dest="algorithm",
        default="synthetic",
        choices=ALGORITHMS,
    )
    p.add_argument("--rounds", type=int, default=None, help="default: 1 for one-shot, 3 otherwise")
    p.add_argument("--mode", default="iterative", choices=("one-shot", "iterative"))
    p.add_argument("--method", default="dm", choices=sorted(OBJECTIVES))
    p.add_argument("--param", default="pixels", choices=sorted(PARAMETERIZATIONS))
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument(
        "--budget-bytes", type=int, default=0, help="per-client upload budget (default: from --ipc)"
    )
    p.add_argument("--storage", default="fp32", choices=sorted(STORAGE_DTYPES))
    p.add_argument(
        "--iterations", type=int, default=200, help="distillation iterations per client and round"
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=0.0,
        help="per-client epsilon over the run (private distillation, or DP-SGD for fedavg)",
    )
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--server-epochs", type=int, default=0)
    p.add_argument(
        "--local-epochs",
        type=int,
        default=1,
        help="the baselines' (fedavg, fedprox, fedavgm) local epochs per round",
    )
    p.add_argument("--proximal-mu", type=float, default=0.01)
    p.add_argument("--fraction-train", type=float, default=1.0)
    p.add_argument(
        "--screen",
        type=float,
        default=0.0,
        help="poisoning screen: refuse uploads whose peers classify fewer than this share of "
        "their images as labelled (0: off; e.g. 0.5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key (see FedConfig), e.g. --set perturb=0.1",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>-<strategy>)")
    p.add_argument(
        "--resume", action="store_true", help="continue after the checkpoint's last round"
    )
    p.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="Ray resources per simulated client"
    )
    p.set_defaults(handler=simulate)


def _config(args: argparse.Namespace) -> FedConfig:
    from fedcl_dd.cli import parse_settings

    from .config import FedConfig

    values = {
        "preset": args.preset,
        "algorithm": args.algorithm,
        "mode": args.mode,
        "method": args.method,
        "param": args.param,
        "ipc": args.ipc,
        "budget-bytes": args.budget_bytes,
        "storage": args.storage,
        "iterations": args.iterations,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "clip": args.clip,
        "server-epochs": args.server_epochs,
        "local-epochs": args.local_epochs,
        "proximal-mu": args.proximal_mu,
        "fraction-train": args.fraction_train,
        "screen": args.screen,
        "seed": args.seed,
        "rounds": args.rounds
        or (1 if args.mode == "one-shot" and args.algorithm == "synthetic" else 3),
    }
    own_flags = {k: "--strategy" if k == "algorithm" else f"--{k}" for k in values}
    values.update(parse_settings(args.set, own_flags=own_flags))
    if args.epsilon > 0 and args.algorithm == "synthetic":
        values["method"] = private_variant(
            str(values["method"])
        )  # --epsilon asks for a private objective
    return FedConfig.from_mapping(values)


def private_variant(method: str) -> str:
    """``method`` if it is private, else the one registered private objective derived from it."""
    base = get_objective(method)
    if base.private:
        return method
    found = sorted(n for n, c in OBJECTIVES.items() if c.private and issubclass(c, base))
    if len(found) != 1:
        raise ValueError(
            f"--epsilon needs a private method; {method!r} is not one and has "
            + (
                f"several private variants {found}: pick one with --method"
                if found
                else "no private variant"
            )
        )
    return found[0]


def simulate(args: argparse.Namespace) -> int:
    """Run the configured rounds on the Ray backend and write results into ``--out``."""
    try:
        from .report import format_table
        from .simulation import simulate as run
    except ImportError as exc:
        raise ValueError(f"simulate needs Flower: pip install 'fedcl-dd[flower]' ({exc})") from exc
    from fedcl_dd.cli import resolve_device

    cfg = _config(args)
    out = Path(args.out or f"runs/{cfg.preset}-{cfg.algorithm}")
    results = run(
        cfg,
        out,
        resume=args.resume,
        data_root=args.data_root,
        device=resolve_device(args.device),
        cpus_per_client=args.cpus_per_client,
    )
    print(format_table({cfg.algorithm: results["rounds"]}))
    print(f"wrote {out}/results.json and {out}/accuracy.png")
    return 0
