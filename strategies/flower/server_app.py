"""The ServerApp: one federated run of our strategy or of Flower's own FedAvg / FedProx / FedAvgM.

``flwr run .`` reads the run configuration from ``[tool.flwr.app.config]`` (keys of
:class:`~fedcl_dd.strategies.flower.config.FedConfig`, plus ``out-dir`` and ``resume``);
``fedcl-dd simulate`` builds the same run from its own flags. Each run writes
``results.json``, accuracy plots, the clients' class histogram (``partitions.png``) and,
for synthetic sets, a grid of one client's upload and a per-round checkpoint into ``out-dir``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fedcl_dd.scenarios.federated import (
    cached_dataset,
    class_histogram,
    format_histogram,
    plot_histogram,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx
from torch import nn

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import resolve_device
from fedcl_dd.evaluate import accuracy
from fedcl_dd.io import CorruptCheckpoint, load_checkpoint, save_checkpoint, write_json
from fedcl_dd.viz import save_grid

from .config import FedConfig
from .payload import ARRAYS, METRICS, load_model_arrays, metric_float, metric_int, model_arrays
from .report import plot_runs
from .strategy import (
    CheckpointMismatch,
    SyntheticSetStrategy,
    check_same_config,
    checked_model_state,
    initial_model,
    messages_bytes,
)

__all__ = ["SERVER_KEYS", "ServerRun", "app", "build_run", "run_server", "write_results"]

app = ServerApp()

#: Run-config keys for the server alone (everything else is a FedConfig field).
SERVER_KEYS = {"out-dir": "runs/flwr", "resume": False}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and SuperLink deployments."""
    keep_freed_memory()
    run_config = dict(context.run_config)
    server = {k: run_config.pop(k, default) for k, default in SERVER_KEYS.items()}
    cfg = FedConfig.from_mapping(run_config)
    run_server(grid, cfg, Path(str(server["out-dir"])), resume=bool(server["resume"]))


def _sum_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Baselines' train metrics: replies, examples and received bytes summed (not averaged);
    the clients' seconds, the slowest and the sum."""
    metrics = [c.metric_records[METRICS] for c in contents]
    seconds = [metric_float(m, "seconds", 0.0) for m in metrics]
    out: dict[str, int | float] = {
        "accepted": len(metrics),
        "num-examples": sum(metric_int(m, "num-examples") for m in metrics),
        # What the server received, not what the clients say they sent.
        "upload-bytes": sum(c.array_records[ARRAYS].count_bytes() for c in contents),
        "client-seconds-max": max(seconds, default=0.0),
        "client-seconds-sum": sum(seconds),
    }
    eps = [metric_float(m, "epsilon-total", 0.0) for m in metrics if "epsilon-total" in m]
    if eps:
        out["epsilon-max"] = max(eps)
    return MetricRecord({**out})


@dataclass
class ServerRun:
    """One run, built and not yet started: its strategy, initial model and history so far."""

    cfg: FedConfig
    out_dir: Path
    strategy: FedAvg
    initial_arrays: ArrayRecord
    done: int  # rounds completed before this process (resume)
    evaluator: nn.Module  # the model the global arrays are loaded into for evaluation
    test: Any  # the dataset whose test split the server evaluates on
    histogram: Any  # training samples per client and class
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, MetricRecord] = field(default_factory=dict)  # this round's metrics so far
    started: float = field(default_factory=time.perf_counter)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's ``evaluate_fn``: test accuracy of the global model, kept in the history
        (and, for the baselines, checkpointed with the model after every round)."""
        r = self.done + server_round
        net = load_model_arrays(self.evaluator, arrays)
        acc = accuracy(net, self.test.test_x, self.test.test_y)
        if server_round == 0 and r in self.history:  # a resumed run's model, measured already
            return MetricRecord({"accuracy": acc})
        train, sent = self.pending.pop("train", None), self.pending.pop("sent", None)
        validation = self.pending.pop("validation", MetricRecord()).get("accuracy")
        self.history[r] = {
            "accuracy": acc,
            "validation": float(validation) if isinstance(validation, (int, float)) else None,
            "seconds": time.perf_counter() - self.started,
            # Plain dicts: the history goes into checkpoints, which hold plain data only.
            "train": dict(train) if train is not None else None,
            "sent": dict(sent) if sent is not None else None,
        }
        if isinstance(self.strategy, SyntheticSetStrategy):
            measured = {"accuracy": acc, "validation": self.history[r]["validation"]}
            self.strategy.record_evaluation(
                server_round, {k: v for k, v in measured.items() if v is not None}
            )
        elif r:
            save_baseline_checkpoint(self, arrays, r)
        if r:
            print(
                f"[{self.cfg.algorithm}] round {r}/{self.cfg.rounds}: accuracy {acc:.4f}",
                file=sys.stderr,
                flush=True,
            )
            # Rewritten every round, so an interrupted run still leaves its rounds so far.
            write_results(self, complete=False)
        return MetricRecord({"accuracy": acc})

    def results(self, complete: bool) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "rounds": _round_rows(self.strategy, self.history),
            "resumed_after": self.done,
            "complete": complete,
        }


def build_run(
    cfg: FedConfig,
    out_dir: Path,
    resume: bool = False,
    data_root: str | None = None,
    device: torch.device | None = None,
) -> ServerRun:
    """Everything a run needs before its first round; writes nothing."""
    device = device or resolve_device()
    preset = cfg.preset_obj
    spec = preset.spec
    evaluator = initial_model(cfg, device)
    arrays, done = model_arrays(evaluator), 0
    pending: dict[str, MetricRecord] = {}
    history: dict[int, dict[str, Any]] = {}
    if cfg.algorithm == "synthetic":
        synthetic = SyntheticSetStrategy(cfg, checkpoint=out_dir / CHECKPOINT, device=device)
        if resume:
            arrays, done = synthetic.resume()
            if synthetic.initial_evaluation:  # the round-0 row, kept by the checkpoint
                history[0] = {"accuracy": synthetic.initial_evaluation["accuracy"]}
        strategy: FedAvg = synthetic
    else:
        strategy = _baseline(cfg, pending)
    _keep_validation(strategy, pending)
    if resume and isinstance(strategy, _Metered):
        arrays, done, history, server_state = resume_baseline(cfg, out_dir / CHECKPOINT)
        strategy.round_offset = done
        strategy.restore_server_state(server_state)
    return ServerRun(
        cfg,
        out_dir,
        strategy,
        arrays,
        done,
        evaluator,
        cached_dataset(spec.name, data_root),
        class_histogram(preset, data_root),
        history=history,
        pending=pending,
    )


#: A run's checkpoint in its output folder: our strategy's (SyntheticSetStrategy.save_checkpoint)
#: or a baseline's (global model, completed rounds, history; save_baseline_checkpoint).
CHECKPOINT = "checkpoint.pt"


def save_baseline_checkpoint(run: ServerRun, arrays: ArrayRecord, done: int) -> None:
    """After round ``done`` of a FedAvg/FedProx/FedAvgM run: its configuration, global model,
    history and the strategy's own state (FedAvgM's momentum; FedAvg and FedProx keep none
    between rounds), atomically: enough to resume the run exactly where it stopped."""
    assert isinstance(run.strategy, _Metered)
    state = {
        "config": run.cfg.to_dict(),
        "round": done,
        "model": dict(arrays.to_torch_state_dict()),
        "history": run.history,
        "server_state": run.strategy.server_state(),
    }
    save_checkpoint(state, run.out_dir / CHECKPOINT)


def resume_baseline(
    cfg: FedConfig, path: Path
) -> tuple[ArrayRecord, int, dict[int, dict[str, Any]], dict[str, torch.Tensor]]:
    """The global model, completed rounds, history and strategy state (FedAvgM's momentum,
    checked against the model) a baseline run left at ``path``; refused (naming the problem)
    when missing, altered, or written by another configuration."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; start without resume")
    state = load_checkpoint(path)
    try:
        check_same_config(path, state["config"], cfg)
        done = state["round"]
        if not isinstance(done, int) or not 0 < done <= int(state["config"]["rounds"]):
            raise ValueError(f"round {done!r} is not a completed round of the run")
        model = checked_model_state(cfg, state["model"])
        history = {int(r): dict(h) for r, h in state["history"].items()}
        if sorted(k for k in history if k > 0) != list(range(1, done + 1)):
            raise ValueError(f"its history does not hold rounds 1..{done}")
        # Written before strategies kept state: FedAvg's and FedProx's, which have none.
        server_state = state.get("server_state", {})
        if server_state:
            server_state = checked_model_state(cfg, server_state)
    except CheckpointMismatch:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpoint(
            f"{path} does not hold a valid state of this run ({type(exc).__name__}: {exc})"
        ) from None
    return ArrayRecord(model), done, history, server_state


# The counter below is a mixin over Flower's strategies; type-checked as one of them.
if TYPE_CHECKING:
    _Strategy = FedAvg
else:
    _Strategy = object


class _Metered(_Strategy):
    """Flower's baseline strategy, metered as our strategy meters itself: the bytes its train
    messages carry (the global model and config to each sampled node; ``sent_bytes``) and
    the seconds it takes to aggregate the replies, into ``pending["sent"]``. A resumed run
    numbers its rounds after the checkpoint's (``round_offset``), so that its clients draw
    what they would have drawn in an uninterrupted run (their seeds follow the round)."""

    pending: dict[str, MetricRecord]
    round_offset: int = 0

    def server_state(self) -> dict[str, torch.Tensor]:
        """What the strategy carries from round to round besides the global model (none)."""
        return {}

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back :meth:`server_state` from a checkpoint."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)[:3]}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        r = server_round + self.round_offset
        messages = list(super().configure_train(r, arrays, config, grid))
        self.pending["sent"] = MetricRecord({"download-bytes": messages_bytes(messages)})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        out = super().aggregate_train(server_round, replies)
        sent = self.pending.setdefault("sent", MetricRecord())
        sent["server-seconds"] = time.perf_counter() - start
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)


class MeteredFedAvg(_Metered, FedAvg):
    """Flower's FedAvg, metered (bytes down, server seconds)."""


class MeteredFedProx(_Metered, FedProx):
    """Flower's FedProx, metered (bytes down, server seconds)."""


class MeteredFedAvgM(_Metered, FedAvgM):
    """Flower's FedAvgM, metered (bytes down, server seconds); its momentum is checkpointed."""

    def server_state(self) -> dict[str, torch.Tensor]:
        """The momentum on the averaged update, by parameter name (empty before round 1)."""
        if self.momentum_vector is None or self.current_arrays is None:
            return {}
        names = list(self.current_arrays.keys())
        return {
            n: torch.from_numpy(m.copy()) for n, m in zip(names, self.momentum_vector, strict=True)
        }

    def restore_server_state(self, state: dict[str, torch.Tensor]) -> None:
        # In the global model's parameter order, which FedAvgM's aggregation follows.
        self.momentum_vector = [t.numpy() for t in state.values()] if state else None


def _baseline(cfg: FedConfig, pending: dict[str, MetricRecord]) -> FedAvg:
    """Flower's own FedAvg, FedProx or FedAvgM; each round's summed train metrics go to
    ``pending``."""

    def sum_train_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        pending["train"] = _sum_metrics(contents, weighted_by_key)
        return pending["train"]

    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.nodes_required,
        train_metrics_aggr_fn=sum_train_metrics,
    )
    strategy: _Metered
    if cfg.algorithm == "fedprox":
        strategy = MeteredFedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.algorithm == "fedavgm":
        strategy = MeteredFedAvgM(
            server_learning_rate=cfg.server_update_lr,
            server_momentum=cfg.server_momentum,
            **common,
        )
    else:
        strategy = MeteredFedAvg(**common)
    strategy.pending = pending
    return strategy


def _keep_validation(strategy: FedAvg, pending: dict[str, MetricRecord]) -> None:
    """Each round's aggregated client evaluation (accuracy on the clients' held-out shares of
    their training data: the validation accuracy settings are chosen on) into
    ``pending["validation"]``. Flower aggregates it before calling ``evaluate_fn`` in the same
    round, which files it with that round, so every checkpoint and every rewrite of the
    results holds the validation of the rounds done so far."""
    aggregate = strategy.evaluate_metrics_aggr_fn

    def keep(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        pending["validation"] = aggregate(contents, weighted_by_key)
        return pending["validation"]

    strategy.evaluate_metrics_aggr_fn = keep


def write_results(run: ServerRun, complete: bool) -> dict[str, Any]:
    """``results.json``; once complete, also the accuracy plot and a grid of one upload."""
    results = run.results(complete)
    write_json(results, run.out_dir / "results.json")
    if complete:
        plot_runs(
            {run.cfg.algorithm: results["rounds"]},
            run.out_dir / "accuracy.png",
            title=run.cfg.preset,
        )
        pool = run.strategy.pool if isinstance(run.strategy, SyntheticSetStrategy) else {}
        if pool:
            first = min(pool)
            save_grid(pool[first], run.out_dir / f"upload-client{first}.png")
    return results


def run_server(
    grid: Grid,
    cfg: FedConfig,
    out_dir: Path,
    resume: bool = False,
    data_root: str | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds on ``grid``; write and return the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, out_dir, resume, data_root, device)
    name = cfg.preset_obj.name
    print(
        f"{name}: training samples per client and class\n{format_histogram(run.histogram)}",
        file=sys.stderr,
    )
    plot_histogram(run.histogram, out_dir / "partitions.png", title=name)
    if run.done >= cfg.rounds:
        print(f"{out_dir}: all {cfg.rounds} rounds are done already", file=sys.stderr)
    else:
        record = ConfigRecord(cfg.to_dict())
        run.strategy.start(
            grid=grid,
            initial_arrays=run.initial_arrays,
            num_rounds=cfg.rounds - run.done,
            timeout=cfg.round_timeout,
            train_config=record,
            evaluate_config=record,
            evaluate_fn=run.evaluate,
        )
    return write_results(run, complete=True)


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
                    "validation_accuracy": rep.evaluation.get("validation"),
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
                    "client_seconds_sum": rep.client_seconds_sum,
                    "download_bytes": rep.download_bytes,
                    "screen_scores": {str(k): v for k, v in rep.screen_scores.items()},
                }
            )
        return rows
    total = 0
    for r in sorted(k for k in history if k > 0):
        m = history[r].get("train")
        sent = history[r].get("sent") or {}
        up = int(m["upload-bytes"]) if m is not None else 0
        total += up
        rows.append(
            {
                "round": r,
                "accuracy": history[r].get("accuracy"),
                "validation_accuracy": history[r].get("validation"),
                "upload_bytes": up,
                "upload_bytes_total": total,
                "epsilon_max": float(m["epsilon-max"])
                if m is not None and "epsilon-max" in m
                else 0.0,
                "accepted": int(m["accepted"]) if m is not None else 0,
                "server_seconds": float(sent.get("server-seconds", 0.0)),
                "client_seconds_max": float(m["client-seconds-max"]) if m is not None else 0.0,
                "client_seconds_sum": float(m["client-seconds-sum"]) if m is not None else 0.0,
                "download_bytes": int(sent.get("download-bytes", 0)),
            }
        )
    return rows
