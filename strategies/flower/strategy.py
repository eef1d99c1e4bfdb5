"""``SyntheticSetStrategy``: clients upload synthetic sets; the server trains on their union.

A subclass of Flower's ``FedAvg``. What it changes, and what it keeps:

- ``configure_train`` is ours: it samples ``fraction_train`` of the connected nodes itself,
  with a generator seeded by the run seed and the round (a rerun or a resumed run picks
  the same nodes), and waits for ``min_available_nodes`` before the first round only.
- ``configure_evaluate`` is Flower's, called with ``min_available_nodes`` lowered to 1 so a
  node lost during training cannot stall the evaluate round.
- ``aggregate_train`` is ours, in four steps: :func:`collect_replies` (errors, timeouts,
  replies to messages never sent), :meth:`~SyntheticSetStrategy.admit` (each reply
  validated on its own, and in private runs accounted by :class:`ClientLedgers`),
  :meth:`~SyntheticSetStrategy.train_on_pool` (the pool and the server's training, which
  keeps the previous model if the result is not finite or has collapsed) and the
  :class:`RoundReport`.
  Flower's own consistency check would end the run on one odd reply; ours never lets a
  failed, missing or malformed reply abort the round.
- ``start`` is Flower's, once ``initial_arrays`` is checked against the run's model;
  ``aggregate_evaluate`` and the evaluate function are Flower's.

Rounds are checkpointed atomically (global model, round, pool, privacy ledgers, history);
:meth:`SyntheticSetStrategy.resume` restores them, and the server continues with
``start(initial_arrays=..., num_rounds=remaining)`` -- Flower's ``start`` has no resume
hook, so the strategy numbers rounds from its checkpoint's offset.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from fedcl_dd.scenarios.federated import cached_dataset
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcl_dd.augment import DSA
from fedcl_dd.compiled import compile_embedding
from fedcl_dd.evaluate import accuracy, train_model
from fedcl_dd.io import CorruptCheckpoint, load_checkpoint, save_checkpoint
from fedcl_dd.models import make_model
from fedcl_dd.screen import screen_sets
from fedcl_dd.synthetic import SyntheticSet

from .config import FedConfig
from .identities import PartitionBindings
from .ledgers import ClientLedgers
from .payload import (
    ARRAYS,
    CONFIG,
    InvalidUpload,
    Upload,
    load_model_arrays,
    model_arrays,
    read_upload,
)
from .seeding import SERVER_ID, client_seed

__all__ = [
    "CheckpointMismatch",
    "RoundReport",
    "SyntheticSetStrategy",
    "check_same_config",
    "checked_model_state",
    "collect_replies",
]


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with another configuration."""


def sent_bytes(record: Any) -> int:
    """Bytes of a record sent to a node, as Flower counts them (``count_bytes``: tensor data
    plus names, shapes and dtypes; config values 1 byte a bool, 8 a number, their length for
    text). Config records are counted here because Flower's own count refuses an empty string
    (the run config's "unset" for a text option) as "not a config value"."""
    if not isinstance(record, ConfigRecord):
        return int(record.count_bytes())

    def value_bytes(v: Any) -> int:
        if isinstance(v, list):
            return sum(value_bytes(x) for x in v)
        if isinstance(v, bool):
            return 1
        return len(v) if isinstance(v, (str, bytes)) else 8

    return sum(len(k) + value_bytes(v) for k, v in record.items())


def messages_bytes(messages: Iterable[Message]) -> int:
    """Bytes of every record of ``messages``, counted by :func:`sent_bytes`."""
    return sum(sent_bytes(record) for m in messages for record in m.content.values())


@dataclass
class RoundReport:
    """What happened in one round, for logs, metrics and the results JSON."""

    round: int
    accepted: list[int] = field(default_factory=list)  # partition ids
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"node", "reason"}
    failed: list[dict[str, Any]] = field(default_factory=list)
    upload_bytes: int = 0
    upload_bytes_total: int = 0
    download_bytes: int = 0  # the global model and config, once for every node sent one
    epsilon: dict[int, float] = field(default_factory=dict)  # partition id -> epsilon spent so far
    pool_images: int = 0
    server_seconds: float = 0.0
    client_seconds_max: float = 0.0
    client_seconds_sum: float = 0.0
    kept_previous_model: bool = False
    note: str = ""  # why the global model was kept, if it was
    # partition id -> the screen's score (absent: screen off, or nothing to compare with)
    screen_scores: dict[int, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)

    def accept(self, up: Upload) -> None:
        self.accepted.append(up.partition_id)
        self.upload_bytes += up.nbytes
        self.client_seconds_max = max(self.client_seconds_max, up.seconds)
        self.client_seconds_sum += up.seconds

    def log(self) -> None:
        """Every refused or failed reply, then the round in one line."""
        for kind in ("rejected", "failed"):
            for item in getattr(self, kind):
                log(
                    WARNING,
                    "round %d: %s reply from node %s: %s",
                    self.round,
                    kind,
                    item["node"],
                    item["reason"],
                )
        if self.kept_previous_model:
            log(WARNING, "round %d: the global model stays as it was: %s", self.round, self.note)
        log(
            INFO,
            "round %d: accepted %d, rejected %d, failed %d; %d bytes uploaded (%d in total)",
            self.round,
            len(self.accepted),
            len(self.rejected),
            len(self.failed),
            self.upload_bytes,
            self.upload_bytes_total,
        )

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
            "client-seconds-sum": self.client_seconds_sum,
            "download-bytes": self.download_bytes,
            "kept-previous-model": int(self.kept_previous_model),
        }
        if self.epsilon:
            out["epsilon-max"] = max(self.epsilon.values())
            out.update({f"epsilon-client-{pid}": eps for pid, eps in sorted(self.epsilon.items())})
        return MetricRecord({**out})


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
        # The most images an honest upload can replay, whatever share of the classes it holds:
        # a bound on what the server materializes and trains on, beside the bytes.
        param = cfg.recipe().parameterization(self.spec)
        self.max_images = max(
            param.max_images(self.max_bytes, n) for n in range(1, self.spec.num_classes + 1)
        )
        self.round_offset = 0  # rounds completed before this process started (resume)
        self.pool: dict[int, SyntheticSet] = {}
        self.ledgers = ClientLedgers(cfg.epsilon, cfg.delta) if cfg.private else None
        self.bindings = PartitionBindings()
        self.reports: list[RoundReport] = []
        # The initial model's evaluation (round 0), kept so a resumed run still reports it.
        self.initial_evaluation: dict[str, float] = {}
        self._global: ArrayRecord | None = None
        self._outgoing: list[Message] = []

    # ------------------------------------------------------------------------ drop-in use
    def initial_arrays(self) -> ArrayRecord:
        """The run's model (``cfg.model``), initialized from the run seed: what round 1 sends."""
        return model_arrays(initial_model(self.cfg, self.device))

    def evaluate_fn(
        self,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        data_root: str | None = None,
    ) -> Callable[[int, ArrayRecord], MetricRecord]:
        """Flower's ``evaluate_fn``: the global model's accuracy on ``(images, labels)`` -- raw
        pixels in [0, 1], (N, C, H, W), normalized here as the clients' data is -- or, without
        them, on the test split of the run's dataset."""
        spec = self.spec
        if images is None or labels is None:
            test = cached_dataset(spec.name, data_root)
            x, y = test.test_x, test.test_y
        else:
            if tuple(images.shape[1:]) != spec.image_shape or images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match "
                    f"the run's {spec.name} images (N, {', '.join(map(str, spec.image_shape))})"
                )
            if float(images.min()) < 0 or float(images.max()) > 1:
                raise ValueError(
                    "images must be raw pixels in [0, 1] (they are normalized here with the "
                    f"dataset's mean {spec.mean} and std {spec.std})"
                )
            x, y = spec.normalize(images.float()), labels.long()
        net = initial_model(self.cfg, self.device)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            return MetricRecord({"accuracy": accuracy(load_model_arrays(net, arrays), x, y)})

        return evaluate

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``Strategy.start``, once ``initial_arrays`` is checked against the run's
        model -- at once, before any client spends a round on a model the server cannot load."""
        try:
            checked_model_state(self.cfg, dict(initial_arrays.to_torch_state_dict()))
        except ValueError as exc:
            raise ValueError(
                f"initial_arrays do not fit the run's model {self.cfg.model!r}: {exc}; pass "
                "strategy.initial_arrays(), or set FedConfig(model=...) to your model's name"
            ) from None
        return super().start(grid, initial_arrays, *args, **kwargs)

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
        # Wait for the federation to assemble before the first round only (at most node_wait
        # seconds): later, a node that died must not stall the run -- the round goes on with
        # the nodes still connected.
        deadline = time.monotonic() + self.cfg.node_wait
        while len(nodes) < self.min_available_nodes and not self.reports:
            if time.monotonic() >= deadline:
                break
            if int(deadline - time.monotonic()) % 10 == 0:
                log(
                    INFO,
                    "waiting for nodes: %d connected, %d required",
                    len(nodes),
                    self.min_available_nodes,
                )
            time.sleep(1)
            nodes = sorted(grid.get_node_ids())
        if not nodes and not self.reports:
            raise RuntimeError(
                f"no node connected within node-wait={self.cfg.node_wait:g} s; start the "
                f"SuperNodes (preset {self.cfg.preset} has {self.cfg.preset_obj.num_clients}) "
                "or raise node-wait"
            )
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
        """Collect, admit, train on the pool, report and checkpoint; never abort the round."""
        r = self.round_offset + server_round
        report = RoundReport(round=r)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outgoing}
        uploads: list[Upload] = []
        for node, content in collect_replies(replies, sent, report):
            try:
                up = self.admit(content, {u.partition_id for u in uploads}, node)
            except InvalidUpload as exc:
                report.rejected.append({"node": node, "reason": str(exc)})
                continue
            except Exception as exc:  # a reply must never end the run: refuse it, say why
                reason = f"could not be read ({type(exc).__name__}: {exc})"
                report.rejected.append({"node": node, "reason": reason})
                continue
            uploads.append(up)
        uploads = self.screen(uploads, report)
        for up in uploads:
            report.accept(up)
        report.accepted.sort()
        previous = self.reports[-1].upload_bytes_total if self.reports else 0
        report.upload_bytes_total = previous + report.upload_bytes
        report.download_bytes = messages_bytes(self._outgoing)
        report.epsilon = self.ledgers.epsilons() if self.ledgers is not None else {}
        arrays = self.train_on_pool(r, uploads, report)
        self.reports.append(report)
        report.log()
        self.save_checkpoint()
        return arrays, report.metrics()

    def admit(
        self, content: RecordDict, seen: Iterable[int] = (), node: int | None = None
    ) -> Upload:
        """Admit one reply: a valid set for this run and budget, a partition in range, not in
        ``seen`` and held by ``node`` (:attr:`bindings`; None skips the check), and (private
        runs) a release the client's budget still covers.

        In private runs the release is booked in :attr:`ledgers` once it decodes, can be
        accounted and comes from the partition's node, whether or not it is then admitted:
        the server has received it. Raises :class:`InvalidUpload` with the reason.
        """
        up = read_upload(content, self.spec, self.max_bytes, self.max_images)
        pid = up.partition_id
        if not 0 <= pid < self.cfg.preset_obj.num_clients:
            raise InvalidUpload(
                f"partition-id {pid} is outside 0..{self.cfg.preset_obj.num_clients - 1}"
            )
        if node is not None:
            self.bindings.claim(node, pid)
            up.node = node
        spent = self.ledgers.book(up) if self.ledgers is not None else 0.0
        if pid in set(seen):
            raise InvalidUpload(
                f"partition {pid} already uploaded this round (two nodes share one partition-id)"
            )
        if self.ledgers is not None:
            self.ledgers.check_budget(up, spent)
        return up

    def screen(self, uploads: list[Upload], report: RoundReport) -> list[Upload]:
        """The uploads that pass the poisoning screen (:func:`~fedcl_dd.screen.screen_sets`,
        threshold ``cfg.screen``; all of them when it is 0), each scored against this
        round's others and the pool's sets of other clients, in the embedding of the
        global model sent this round. The refused go to ``report.rejected``."""
        if not self.cfg.screen or not uploads:
            return uploads
        peers = dict(self.pool)
        peers.update({up.partition_id: up.syn for up in uploads})
        net = initial_model(self.cfg, self.device)
        if self._global is not None:
            load_model_arrays(net, self._global)
        try:
            result = screen_sets(peers, net, self.cfg.screen, device=self.device)
        except Exception as exc:  # the screen must not end the round: it admits, and says so
            report.note = f"the screen failed ({type(exc).__name__}: {exc}); nothing screened out"
            log(WARNING, "round %d: %s", report.round, report.note)
            return uploads
        report.screen_scores = {
            up.partition_id: score
            for up in uploads
            if not math.isnan(score := result.scores[up.partition_id])
        }
        passed = []
        for up in uploads:
            reason = result.refused.get(up.partition_id)
            if reason is None:
                passed.append(up)
            else:
                report.rejected.append(
                    {"node": up.node, "partition": up.partition_id, "reason": reason}
                )
        return passed

    def train_on_pool(
        self, r: int, uploads: list[Upload], report: RoundReport
    ) -> ArrayRecord | None:
        """Add this round's sets to the pool and train the global model on it.

        Returns the new global model, or None (Flower keeps the current one) when no upload
        was admitted or the trained model is not finite or has collapsed (one class for every
        image of a pool that holds several).
        """
        if uploads:
            if self.cfg.pool == "none":
                self.pool = {}
            self.pool.update({up.partition_id: up.syn for up in uploads})
        report.pool_images = sum(s.num_images for s in self.pool.values())
        if not uploads:
            report.kept_previous_model, report.note = True, "no valid upload"
            return None
        start = time.perf_counter()
        images, targets = self.union()
        net = self._train_global(r, images, targets)
        report.server_seconds = time.perf_counter() - start
        problem = self._unfit(net, images, targets)
        if problem:
            report.kept_previous_model = True
            partitions = sorted(up.partition_id for up in uploads)
            report.note = (
                f"training on the pool gave {problem} (this round's uploads: "
                f"partitions {partitions})"
            )
            return None
        self._global = model_arrays(net)
        return self._global

    def _unfit(self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> str:
        """Why ``net``, trained on the pool's ``(images, targets)``, must not become the
        global model ("" if it may)."""
        if not all(torch.isfinite(t).all() for t in net.state_dict().values()):
            return "a non-finite model"
        labels = targets.argmax(1) if targets.is_floating_point() else targets
        if labels.unique().numel() > 1:
            net.eval()
            with torch.no_grad():
                predicted = torch.cat(
                    [net(part.to(self.device)).argmax(1).cpu() for part in images.split(1024)]
                )
            if predicted.unique().numel() == 1:
                return f"a collapsed model (class {int(predicted[0])} for every pooled image)"
        return ""

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

    def _train_global(self, r: int, images: torch.Tensor, targets: torch.Tensor) -> nn.Module:
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
        if self.cfg.compile:
            compile_embedding(net, self.cfg.compile)
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
            precision=self.cfg.precision,
        )

    def record_evaluation(self, server_round: int, metrics: dict[str, float]) -> None:
        """Attach centralized evaluation results to the round's report (and checkpoint them)."""
        r = self.round_offset + server_round
        if r == 0:
            self.initial_evaluation = dict(metrics)
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
            "ledgers": self.ledgers.state_dict() if self.ledgers is not None else {},
            "reports": [asdict(rep) for rep in self.reports],
            "initial_evaluation": self.initial_evaluation,
        }
        save_checkpoint(state, self.checkpoint)

    def resume(self) -> tuple[ArrayRecord, int]:
        """Load the checkpoint; return the global model and the number of completed rounds.

        Settings that change what a round computes must match (``rounds`` may grow).
        """
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise FileNotFoundError(f"no checkpoint at {self.checkpoint}; start without resume")
        state = load_checkpoint(self.checkpoint)
        try:
            return self._restore(state)
        except CheckpointMismatch:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise CorruptCheckpoint(
                f"{self.checkpoint} does not hold a valid state of this run "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def _restore(self, state: dict[str, Any]) -> tuple[ArrayRecord, int]:
        """Check every part of a loaded checkpoint, then adopt it (nothing before all pass)."""
        saved = state["config"]
        check_same_config(self.checkpoint, saved, self.cfg)
        done = state["round"]
        if not isinstance(done, int) or not 0 <= done <= int(saved["rounds"]):
            raise ValueError(
                f"round {done!r} is not a completed round of a {saved['rounds']}-round run"
            )
        model = checked_model_state(self.cfg, state["model"])
        clients = self.cfg.preset_obj.num_clients
        pool = {}
        for pid, entry in state["pool"].items():
            if not 0 <= int(pid) < clients:
                raise ValueError(f"pool holds partition {pid}, outside 0..{clients - 1}")
            pool[int(pid)] = SyntheticSet.from_state(
                entry["tensors"],
                entry["metadata"],
                max_bytes=self.max_bytes,
                max_images=self.max_images,
            )
        ledgers = (
            ClientLedgers(self.cfg.epsilon, self.cfg.delta) if self.ledgers is not None else None
        )
        if ledgers is not None:
            ledgers.load_state_dict(state["ledgers"])
        reports = [
            RoundReport(
                **{
                    **rep,
                    "epsilon": {int(k): v for k, v in rep["epsilon"].items()},
                    "screen_scores": {int(k): v for k, v in rep.get("screen_scores", {}).items()},
                }
            )
            for rep in state["reports"]
        ]
        # Absent from checkpoints written before it was kept: the resumed run then lacks round 0.
        initial = {str(k): float(v) for k, v in state.get("initial_evaluation", {}).items()}
        # Everything checked: adopt it.
        self.pool, self.ledgers, self.reports = pool, ledgers, reports
        self.initial_evaluation = initial
        self.round_offset = done
        self._global = ArrayRecord(model)
        log(INFO, "resumed from %s after round %d", self.checkpoint, self.round_offset)
        return self._global, self.round_offset


def check_same_config(path: Path | None, saved: dict[str, Any], cfg: FedConfig) -> None:
    """:class:`CheckpointMismatch` unless the checkpoint at ``path`` was written by ``cfg``'s
    configuration (``rounds`` may grow: a resumed run may go further).

    A key the checkpoint lacks is a setting added since it was written: it agrees when
    ``cfg`` leaves it at its default, which is what runs did before the setting existed."""
    now, defaults = cfg.to_dict(), FedConfig().to_dict()
    differ = sorted(k for k in now if k != "rounds" and saved.get(k, defaults.get(k)) != now[k])
    if differ:
        raise CheckpointMismatch(
            f"{path} was written by another configuration (differs in "
            + ", ".join(f"{k}: {saved.get(k)!r} vs {now[k]!r}" for k in differ)
            + "); resume with the same settings or start a new run"
        )


def checked_model_state(cfg: FedConfig, saved: Any) -> dict[str, torch.Tensor]:
    """``saved`` as the global model's state: the run's model's keys and shapes, finite;
    ``ValueError`` naming the first problem otherwise."""
    expected = initial_model(cfg).state_dict()
    if not isinstance(saved, dict):
        raise ValueError("the model is not a mapping of parameter names to tensors")
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise ValueError(
            f"the model's parameters are not those of the run's model (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name, tensor in saved.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape:
            raise ValueError(f"model parameter {name} has the wrong shape")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"model parameter {name} holds NaN or Inf")
    return dict(saved)


def collect_replies(
    replies: Iterable[Message], sent: dict[str, int], report: RoundReport
) -> list[tuple[int, RecordDict]]:
    """The (node, content) of every reply worth admitting, in arrival order.

    ``sent`` maps the ids of this round's messages to their nodes. Errors and missing
    replies go to ``report.failed``; a reply to a message this round did not send, or a
    second reply to one message, to ``report.rejected``.
    """
    out: list[tuple[int, RecordDict]] = []
    answered: set[str] = set()
    for msg in replies:
        origin = msg.metadata.reply_to_message_id
        node = sent.get(origin, msg.metadata.src_node_id)
        if origin not in sent:
            report.rejected.append(
                {"node": node, "reason": "reply to a message this round did not send"}
            )
        elif origin in answered:
            report.rejected.append({"node": node, "reason": "second reply to one message"})
        elif msg.has_error():
            answered.add(origin)
            report.failed.append(
                {"node": node, "reason": f"error {msg.error.code}: {msg.error.reason}"}
            )
        else:
            answered.add(origin)
            out.append((node, msg.content))
    for origin, node in sent.items():
        if origin not in answered:
            report.failed.append({"node": node, "reason": "no reply before the round timeout"})
    return out


def initial_model(cfg: FedConfig, device: torch.device | str = "cpu") -> nn.Module:
    """``cfg.model`` for the run's dataset, initialized from the run seed (the server's draw)."""
    spec = cfg.preset_obj.spec
    gen = torch.Generator().manual_seed(client_seed(cfg.seed, 0, SERVER_ID))
    return make_model(cfg.model, spec.channels, spec.num_classes, spec.image_size, gen, device)
