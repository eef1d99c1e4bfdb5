"""The ServerApp: one federated run of our strategy or of Flower's own FedAvg / FedProx.

``flwr run .`` reads the run configuration from ``[tool.flwr.app.config]`` (keys of
:class:`~fedcl_dd.strategies.flower.config.FedConfig`, plus ``out-dir`` and ``resume``);
``fedcl-dd simulate`` builds the same run from its own flags. Each run writes
``results.json``, accuracy plots, the clients' class histogram (``partitions.png``) and,
for synthetic sets, a grid of one client's upload and a per-round checkpoint into ``out-dir``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from fedcl_dd.scenarios.federated import (
    cached_dataset,
    class_histogram,
    format_histogram,
    plot_histogram,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from fedcl_dd.cli import resolve_device
from fedcl_dd.evaluate import accuracy
from fedcl_dd.io import write_json
from fedcl_dd.models import make_model
from fedcl_dd.viz import save_grid

from .client_app import client_seed
from .config import FedConfig
from .payload import METRICS, load_model_arrays, model_arrays
from .report import plot_runs
from .strategy import SERVER_ID, SyntheticSetStrategy

__all__ = ["SERVER_KEYS", "app", "run_server"]

app = ServerApp()

#: Run-config keys for the server alone (everything else is a FedConfig field).
SERVER_KEYS = {"out-dir": "runs/flwr", "resume": False}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and SuperLink deployments."""
    run_config = dict(context.run_config)
    server = {k: run_config.pop(k, default) for k, default in SERVER_KEYS.items()}
    cfg = FedConfig.from_mapping(run_config)
    run_server(grid, cfg, Path(str(server["out-dir"])), resume=bool(server["resume"]))


def _sum_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Baselines' train metrics: replies, examples and uploaded bytes summed (not averaged)."""
    metrics = [c[METRICS] for c in contents]
    out = {
        "accepted": len(metrics),
        "num-examples": sum(int(m["num-examples"]) for m in metrics),
        "upload-bytes": sum(int(m["upload-bytes"]) for m in metrics),
    }
    eps = [float(m["epsilon-total"]) for m in metrics if "epsilon-total" in m]
    if eps:
        out["epsilon-max"] = max(eps)
    return MetricRecord(out)


def run_server(
    grid: Grid,
    cfg: FedConfig,
    out_dir: Path,
    resume: bool = False,
    data_root: str | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds on ``grid``; write and return the results."""
    device = device or resolve_device()
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = cfg.preset_obj
    spec = preset.spec
    test = cached_dataset(spec.name, data_root)
    hist = class_histogram(preset, data_root)
    print(
        f"{preset.name}: training samples per client and class\n{format_histogram(hist)}",
        file=sys.stderr,
    )
    plot_histogram(hist, out_dir / "partitions.png", title=preset.name)
    net = make_model(
        cfg.model,
        spec.channels,
        spec.num_classes,
        spec.image_size,
        torch.Generator().manual_seed(client_seed(cfg.seed, 0, SERVER_ID)),
        device,
    )
    arrays = model_arrays(net)
    done = 0
    record = ConfigRecord(cfg.to_dict())
    pending: dict[str, MetricRecord] = {}  # the baselines' train metrics of the round in progress

    def sum_train_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        pending["train"] = _sum_metrics(contents, weighted_by_key)
        return pending["train"]

    if cfg.algorithm == "synthetic":
        strategy: FedAvg = SyntheticSetStrategy(
            cfg, checkpoint=out_dir / "checkpoint.pt", device=device
        )
        if resume:
            arrays, done = strategy.resume()
    else:
        if resume:
            raise ValueError(
                "--resume applies to the synthetic strategy (FedAvg/FedProx runs are not checkpointed)"
            )
        common = dict(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=cfg.nodes_required,
            train_metrics_aggr_fn=sum_train_metrics,
        )
        strategy = (
            FedProx(proximal_mu=cfg.proximal_mu, **common)
            if cfg.algorithm == "fedprox"
            else FedAvg(**common)
        )

    offset = done
    history: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        r = offset + server_round
        acc = accuracy(load_model_arrays(net, arrays), test.test_x, test.test_y)
        history[r] = {
            "accuracy": acc,
            "seconds": time.perf_counter() - started,
            "train": pending.pop("train", None),
        }
        if isinstance(strategy, SyntheticSetStrategy):
            strategy.record_evaluation(server_round, {"accuracy": acc})
        if r:
            print(
                f"[{cfg.algorithm}] round {r}/{cfg.rounds}: accuracy {acc:.4f}",
                file=sys.stderr,
                flush=True,
            )
            # Rewritten every round, so an interrupted run still leaves its rounds so far.
            write_json(
                {
                    "config": cfg.to_dict(),
                    "rounds": _round_rows(strategy, history),
                    "resumed_after": done,
                    "complete": False,
                },
                out_dir / "results.json",
            )
        return MetricRecord({"accuracy": acc})

    if done >= cfg.rounds:
        print(f"{out_dir}: all {cfg.rounds} rounds are done already", file=sys.stderr)
    else:
        strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=cfg.rounds - done,
            timeout=cfg.round_timeout,
            train_config=record,
            evaluate_config=record,
            evaluate_fn=evaluate_fn,
        )
    rounds = _round_rows(strategy, history)
    results = {"config": cfg.to_dict(), "rounds": rounds, "resumed_after": done, "complete": True}
    write_json(results, out_dir / "results.json")
    plot_runs({cfg.algorithm: rounds}, out_dir / "accuracy.png", title=cfg.preset)
    if isinstance(strategy, SyntheticSetStrategy) and strategy.pool:
        first = min(strategy.pool)
        save_grid(strategy.pool[first], out_dir / f"upload-client{first}.png")
    return results


def _round_rows(strategy: FedAvg, history: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round: accuracy, uploaded bytes (round and cumulative), epsilon, replies."""
    rows: list[dict[str, Any]] = []
    if 0 in history:  # the initial model, before any upload
        rows.append(
            {
                "round": 0,
                "accuracy": history[0]["accuracy"],
                "upload_bytes": 0,
                "upload_bytes_total": 0,
                "epsilon_max": 0.0,
            }
        )
    if isinstance(strategy, SyntheticSetStrategy):
        for rep in strategy.reports:
            acc = history.get(rep.round, {}).get("accuracy", rep.evaluation.get("accuracy"))
            rows.append(
                {
                    "round": rep.round,
                    "accuracy": acc,
                    "upload_bytes": rep.upload_bytes,
                    "upload_bytes_total": rep.upload_bytes_total,
                    "epsilon_max": max(rep.epsilon.values()) if rep.epsilon else 0.0,
                    "epsilon": {str(k): v for k, v in rep.epsilon.items()},
                    "accepted": rep.accepted,
                    "rejected": rep.rejected,
                    "failed": rep.failed,
                    "kept_previous_model": rep.kept_previous_model,
                    "pool_images": rep.pool_images,
                    "server_seconds": rep.server_seconds,
                    "client_seconds_max": rep.client_seconds_max,
                }
            )
        return rows
    total = 0
    for r in sorted(k for k in history if k > 0):
        m = history[r]["train"]
        up = int(m["upload-bytes"]) if m is not None else 0
        total += up
        rows.append(
            {
                "round": r,
                "accuracy": history[r]["accuracy"],
                "upload_bytes": up,
                "upload_bytes_total": total,
                "epsilon_max": float(m["epsilon-max"])
                if m is not None and "epsilon-max" in m
                else 0.0,
                "accepted": int(m["accepted"]) if m is not None else 0,
            }
        )
    return rows
