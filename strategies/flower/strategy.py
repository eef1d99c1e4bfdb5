"""``SyntheticSetStrategy``: clients upload synthetic sets; the server trains on their union.

A subclass of Flower's ``FedAvg`` (itself a ``flwr.serverapp.strategy.Strategy``): node
sampling, the evaluate round and ``start()`` are Flower's; training rounds are ours.
``aggregate_train`` validates every reply on its own (Flower's consistency check would end
the run on one odd reply), trains the global model on the accepted sets, and never lets a
failed, missing or malformed reply abort the round.

Rounds are checkpointed atomically (global model, round, pool, privacy ledgers, history);
:meth:`SyntheticSetStrategy.resume` restores them, and the server continues with
``start(initial_arrays=..., num_rounds=remaining)`` -- Flower's ``start`` has no resume
hook, so the strategy numbers rounds from its checkpoint's offset.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcl_dd.augment import DSA
from fedcl_dd.evaluate import train_model
from fedcl_dd.io import atomic_write
from fedcl_dd.models import make_model
from fedcl_dd.privacy import PrivacyLedger
from fedcl_dd.synthetic import SyntheticSet, pixel_ipc_for_budget

from .client_app import client_seed
from .config import FedConfig
from .payload import (
    ARRAYS,
    CONFIG,
    InvalidUpload,
    Upload,
    load_model_arrays,
    model_arrays,
    read_upload,
)

__all__ = ["CheckpointMismatch", "RoundReport", "SyntheticSetStrategy"]

SERVER_ID = -1  # client_seed's partition slot for the server's own training


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with another configuration."""


@dataclass
class RoundReport:
    """What happened in one round, for logs, metrics and the results JSON."""

    round: int
    accepted: list[int] = field(default_factory=list)  # partition ids
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"node", "reason"}
    failed: list[dict[str, Any]] = field(default_factory=list)
    upload_bytes: int = 0
    upload_bytes_total: int = 0
    epsilon: dict[int, float] = field(default_factory=dict)  # partition id -> epsilon spent so far
    pool_images: int = 0
    server_seconds: float = 0.0
    client_seconds_max: float = 0.0
    kept_previous_model: bool = False
    evaluation: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> MetricRecord:
        out: dict[str, float | int] = {
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "failed": len(self.failed),
            "upload-bytes": self.upload_bytes,
            "upload-bytes-total": self.upload_bytes_total,
            "pool-images": self.pool_images,
            "server-seconds": self.server_seconds,
            "client-seconds-max": self.client_seconds_max,
            "kept-previous-model": int(self.kept_previous_model),
        }
        if self.epsilon:
            out["epsilon-max"] = max(self.epsilon.values())
            out.update({f"epsilon-client-{pid}": eps for pid, eps in sorted(self.epsilon.items())})
        return MetricRecord(out)


class SyntheticSetStrategy(FedAvg):
    """Train the global model on the union of the clients' uploaded synthetic sets.

    ``cfg`` is the run configuration (sent to every client with the global model).
    Pool: with ``cfg.pool == "latest"`` the server trains on the newest accepted set of
    every client seen so far (each image weighs the same); with ``"none"`` on this round's
    sets only. One-shot mode trains a fresh model (``cfg.epochs_on_server`` epochs, the
    evaluation protocol); iterative mode fine-tunes the current global model each round.
    """

    def __init__(
        self,
        cfg: FedConfig,
        checkpoint: str | Path | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=cfg.nodes_required,
        )
        self.cfg = cfg
        self.spec = cfg.preset_obj.spec
        self.device = torch.device(device)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.max_bytes = cfg.budget_limit()
        self.max_images = (
            pixel_ipc_for_budget(
                self.max_bytes, self.spec.num_classes, self.spec.image_shape, cfg.recipe().dtype
            )
            * self.spec.num_classes
            if cfg.param == "pixels"
            else None
        )
        self.round_offset = 0  # rounds completed before this process started (resume)
        self.pool: dict[int, SyntheticSet] = {}
        self.ledgers: dict[int, PrivacyLedger] = {}
        self.reports: list[RoundReport] = []
        self._global: ArrayRecord | None = None
        self._outgoing: list[Message] = []

    # ----------------------------------------------------------------------------- rounds
    def summary(self) -> None:
        log(
            INFO,
            "\t├──> SyntheticSetStrategy: %s, %s/%s, %s ipc, pool %s",
            self.cfg.mode,
            self.cfg.method,
            self.cfg.param,
            self.cfg.ipc,
            self.cfg.pool,
        )
        log(
            INFO,
            "\t└──> upload limit %d bytes per client, checkpoint %s",
            self.max_bytes,
            self.checkpoint,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model and the run configuration to a seeded sample of nodes."""
        r = self.round_offset + server_round
        self._global = arrays
        nodes = sorted(grid.get_node_ids())
        # Wait for the federation to assemble before the first round only: later, a node that
        # died must not stall the run -- the round goes on with the nodes still connected.
        while len(nodes) < self.min_available_nodes and not self.reports:
            log(
                INFO,
                "waiting for nodes: %d connected, %d required",
                len(nodes),
                self.min_available_nodes,
            )
            time.sleep(1)
            nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.min_available_nodes:
            log(
                WARNING,
                "round %d: only %d of %d nodes connected; going on with them",
                r,
                len(nodes),
                self.min_available_nodes,
            )
        if not nodes:
            return []
        k = max(1, round(len(nodes) * self.cfg.fraction_train))
        chosen = random.Random(client_seed(self.cfg.seed, r, SERVER_ID)).sample(nodes, k)
        content = ConfigRecord({**dict(config), **self.cfg.to_dict(), "server-round": r})
        self._outgoing = [
            Message(
                RecordDict({ARRAYS: arrays, CONFIG: content}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in chosen
        ]
        log(
            INFO,
            "round %d: sent the global model and config to %d of %d nodes",
            r,
            len(chosen),
            len(nodes),
        )
        return self._outgoing

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's evaluate round, with the run configuration the clients need to find their data.

        It evaluates on the nodes connected now: FedAvg's sampling would wait (without a
        timeout) for ``min_available_nodes``, so a SuperNode lost during training would stall
        the run forever.
        """
        required, self.min_available_nodes = self.min_available_nodes, 1
        try:
            record = ConfigRecord({**dict(config), **self.cfg.to_dict()})
            return super().configure_evaluate(server_round, arrays, record, grid)
        finally:
            self.min_available_nodes = required

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, train on the accepted sets, checkpoint; never abort the round."""
        r = self.round_offset + server_round
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outgoing}
        report = RoundReport(round=r)
        uploads: list[Upload] = []
        answered: set[str] = set()
        for msg in replies:
            origin = msg.metadata.reply_to_message_id
            answered.add(origin)
            node = sent.get(origin, msg.metadata.src_node_id)
            if msg.has_error():
                report.failed.append(
                    {"node": node, "reason": f"error {msg.error.code}: {msg.error.reason}"}
                )
                continue
            try:
                upload = self.validate(msg.content, {u.partition_id for u in uploads})
            except InvalidUpload as exc:
                report.rejected.append({"node": node, "reason": str(exc)})
                continue
            uploads.append(upload)
        for origin, node in sent.items():
            if origin not in answered:
                report.failed.append({"node": node, "reason": "no reply before the round timeout"})
        for kind in ("rejected", "failed"):
            for item in getattr(report, kind):
                log(
                    WARNING,
                    "round %d: %s reply from node %s: %s",
                    r,
                    kind,
                    item["node"],
                    item["reason"],
                )

        for up in uploads:
            report.accepted.append(up.partition_id)
            report.upload_bytes += int(up.metrics["upload-bytes"])
            report.client_seconds_max = max(report.client_seconds_max, float(up.metrics["seconds"]))
            if up.ledger is not None:
                self.ledgers[up.partition_id] = up.ledger
        report.accepted.sort()
        report.upload_bytes_total = report.upload_bytes + (
            self.reports[-1].upload_bytes_total if self.reports else 0
        )
        report.epsilon = {pid: led.epsilon(self.cfg.delta) for pid, led in self.ledgers.items()}

        arrays: ArrayRecord | None = None
        if uploads:
            if self.cfg.pool == "none":
                self.pool = {}
            self.pool.update({up.partition_id: up.syn for up in uploads})
            start = time.perf_counter()
            arrays = model_arrays(self._train_global(r))
            report.server_seconds = time.perf_counter() - start
            self._global = arrays
        else:
            report.kept_previous_model = True
            log(WARNING, "round %d: no valid upload; the global model stays as it was", r)
        report.pool_images = sum(s.num_images for s in self.pool.values())
        self.reports.append(report)
        log(
            INFO,
            "round %d: accepted %d, rejected %d, failed %d; %d bytes uploaded (%d in total)",
            r,
            len(report.accepted),
            len(report.rejected),
            len(report.failed),
            report.upload_bytes,
            report.upload_bytes_total,
        )
        self.save_checkpoint()
        return arrays, report.metrics()

    def validate(self, content: RecordDict, seen: Iterable[int] = ()) -> Upload:
        """Check one reply's content: a valid set for this run and budget, a partition in range
        and not in ``seen``, and (private runs) a release the client's budget still covers.
        Raises :class:`InvalidUpload` with the reason."""
        up = read_upload(content, self.spec, self.max_bytes, self.max_images)
        pid = up.partition_id
        if not 0 <= pid < self.cfg.preset_obj.num_clients:
            raise InvalidUpload(
                f"partition-id {pid} is outside 0..{self.cfg.preset_obj.num_clients - 1}"
            )
        if pid in set(seen):
            raise InvalidUpload(
                f"partition {pid} already uploaded this round (two nodes share one partition-id)"
            )
        if self.cfg.private:
            needed = ("noise-multiplier", "sample-rate", "steps")
            if any(k not in up.metrics for k in needed):
                raise InvalidUpload(
                    f"a private run needs the client's {list(needed)} to account its release"
                )
            trial = PrivacyLedger()
            if pid in self.ledgers:
                trial.load_state_dict(self.ledgers[pid].state_dict())
            try:
                trial.step(
                    up.metrics["noise-multiplier"],
                    up.metrics["sample-rate"],
                    int(up.metrics["steps"]),
                )
            except ValueError as exc:
                raise InvalidUpload(f"unaccountable release: {exc}") from exc
            spent = trial.epsilon(self.cfg.delta)
            if spent > self.cfg.epsilon * (1 + 1e-6):
                raise InvalidUpload(
                    f"the upload brings client {pid} to epsilon={spent:.4g} > budget {self.cfg.epsilon:g}"
                )
            up.ledger = trial
        return up

    def union(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled images and their targets (class ids, or probabilities if any set has soft labels)."""
        sets = [self.pool[pid] for pid in sorted(self.pool)]
        with torch.no_grad():
            images = torch.cat([s.images().float() for s in sets])
            if all(s.label_mode == "hard" for s in sets):
                targets = torch.cat([s.targets().long() for s in sets])
            else:
                n = self.spec.num_classes
                targets = torch.cat(
                    [
                        s.targets().float()
                        if s.label_mode == "soft"
                        else nn.functional.one_hot(s.targets().long(), n).float()
                        for s in sets
                    ]
                )
        return images, targets

    def _train_global(self, r: int) -> nn.Module:
        gen = torch.Generator().manual_seed(client_seed(self.cfg.seed, r, SERVER_ID))
        net = make_model(
            self.cfg.model,
            self.spec.channels,
            self.spec.num_classes,
            self.spec.image_size,
            gen,
            self.device,
        )
        if self.cfg.mode == "iterative" and self._global is not None:
            load_model_arrays(net, self._global)
        images, targets = self.union()
        augment = DSA(
            self.spec.dsa_strategy, torch.Generator().manual_seed(int(gen.initial_seed()) + 1)
        )
        return train_model(
            net,
            images.to(self.device),
            targets.to(self.device),
            self.cfg.epochs_on_server,
            lr=self.cfg.server_lr,
            augment=augment,
            generator=gen,
        )

    def record_evaluation(self, server_round: int, metrics: dict[str, float]) -> None:
        """Attach centralized evaluation results to the round's report (and checkpoint them)."""
        r = self.round_offset + server_round
        for report in self.reports:
            if report.round == r:
                report.evaluation.update(metrics)
                self.save_checkpoint()

    # ------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Write the global model, rounds, pool, ledgers and history atomically (if a path is set)."""
        if self.checkpoint is None or self._global is None:
            return
        state = {
            "config": self.cfg.to_dict(),
            "round": self.reports[-1].round if self.reports else self.round_offset,
            "model": dict(self._global.to_torch_state_dict()),
            "pool": {
                pid: {"tensors": s.state_tensors(), "metadata": s.metadata()}
                for pid, s in self.pool.items()
            },
            "ledgers": {pid: led.state_dict() for pid, led in self.ledgers.items()},
            "reports": [asdict(rep) for rep in self.reports],
        }
        atomic_write(self.checkpoint, lambda f: torch.save(state, f))

    def resume(self) -> tuple[ArrayRecord, int]:
        """Load the checkpoint; return the global model and the number of completed rounds.

        Settings that change what a round computes must match (``rounds`` may grow).
        """
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise FileNotFoundError(f"no checkpoint at {self.checkpoint}; start without resume")
        state = torch.load(self.checkpoint, weights_only=True)
        saved, now = state["config"], self.cfg.to_dict()
        differ = sorted(k for k in now if k != "rounds" and saved.get(k) != now[k])
        if differ:
            raise CheckpointMismatch(
                f"{self.checkpoint} was written by another configuration (differs in "
                + ", ".join(f"{k}: {saved.get(k)!r} vs {now[k]!r}" for k in differ)
                + "); resume with the same settings or start a new run"
            )
        self.pool = {
            int(pid): SyntheticSet.from_state(entry["tensors"], entry["metadata"])
            for pid, entry in state["pool"].items()
        }
        self.ledgers = {}
        for pid, led_state in state["ledgers"].items():
            self.ledgers[int(pid)] = led = PrivacyLedger()
            led.load_state_dict(led_state)
        self.reports = [
            RoundReport(**{**rep, "epsilon": {int(k): v for k, v in rep["epsilon"].items()}})
            for rep in state["reports"]
        ]
        self.round_offset = int(state["round"])
        self._global = ArrayRecord(state["model"])
        log(INFO, "resumed from %s after round %d", self.checkpoint, self.round_offset)
        return self._global, self.round_offset
