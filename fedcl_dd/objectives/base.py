"""The interface every matching objective implements, and what it is handed.

The distillation loop (:mod:`fedcl_dd.distill`) follows the survey's Algorithm 1:
initialize S; repeat { get a network (fresh or from a pool); update it if the
objective says so; update S through the objective }. An objective decides the
network (:meth:`Objective.network`), how many S updates one network serves
(:meth:`Objective.outer_steps`), the loss (:meth:`Objective.loss`) and what
happens to the network between S updates (:meth:`Objective.update_network`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..augment import DSA, AugParams
from ..data import DatasetSpec
from ..models import make_model
from ..options import Option, parse_declared
from ..precision import Precision
from ..privacy import PrivacyLedger, PrivateRandom
from ..sampling import ClassSampler
from ..synthetic import SyntheticSet

__all__ = [
    "REAL_PER_CLASS",
    "DistillationDiverged",
    "MatchingContext",
    "Objective",
    "Plan",
    "PrivateRelease",
    "class_means",
]


class DistillationDiverged(RuntimeError):
    """The loss, the synthetic set or an objective's parameter became NaN/Inf (or left its valid range)."""


NetworkSource = Callable[["MatchingContext"], nn.Module]


@dataclass
class MatchingContext:
    """Everything an objective may use: real data, the model recipe, augmentation, RNG, device.

    ``network_source`` replaces fresh initializations, e.g. FedDM's networks sampled
    around the current global model; it receives this context and returns a network on
    ``device``. ``public`` is data the user may disclose, which a private objective's model
    pool may train on (:mod:`fedcl_dd.pool`). ``precision`` is what the losses run under, and
    ``compile`` the :mod:`fedcl_dd.compiled` mode of the matching networks' embeddings (None:
    eager), both set by :func:`~fedcl_dd.distill.distill` (fp32 and eager until then).
    """

    real: ClassSampler
    spec: DatasetSpec
    model: str = "convnet"
    augment: DSA | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    network_source: NetworkSource | None = None
    public: ClassSampler | None = None
    precision: Precision = field(default_factory=lambda: Precision("fp32", "cpu"))
    compile: str | None = None

    def fresh_network(self) -> nn.Module:
        """A network from ``network_source`` if set, else freshly initialized from ``generator``."""
        if self.network_source is not None:
            return self.network_source(self)
        spec = self.spec
        return make_model(
            self.model,
            spec.channels,
            spec.num_classes,
            spec.image_size,
            self.generator,
            self.device,
        )

    def siamese(self) -> AugParams | None:
        """One augmentation draw for a step, to apply to the real and the synthetic batch alike."""
        return self.augment.sample(1) if self.augment is not None else None

    def apply(self, x: torch.Tensor, params: AugParams | None) -> torch.Tensor:
        return (
            self.augment.apply(x, params)
            if (self.augment is not None and params is not None)
            else x
        )


@dataclass(frozen=True)
class Plan:
    """What an objective is told about the run it serves, besides its options.

    ``iterations`` counts every S update the objective will be asked for over the whole run
    (a federated client: rounds times iterations per round), which a private objective
    plans its noise for; ``cache_dir`` holds costly artifacts such as expert trajectories.
    """

    ipc: int
    iterations: int
    cache_dir: Path | None = None


# Shared by every objective that samples real batches per class: one flag, one meaning.
REAL_PER_CLASS = Option("real_per_class", int, 256, "real images per class and iteration", low=1)


class Objective(abc.ABC):
    """A matching objective: what distance between real and synthetic data S is trained to close.

    Besides the loss, a subclass declares what the method *is*, once: its ``options``
    (keyword arguments of its constructor, with types and ranges), the image learning rate
    by images per class (``lr_by_ipc``: rows ``(from_ipc, lr)``) and momentum, how its set
    starts (``default_init``), whether its release is differentially private (``private``:
    it then never starts from real data), whether its images are kept within the data's
    pixel range after every step (``projects``, where the parameterization stores pixels),
    whether it trains networks, ``quick``:
    the cheapest options that still run every code path (tests and smoke runs), and the
    ``paper`` whose published figures it is compared with (benchmarks), and the optimizer of
    its images (``optimizer``: SGD with ``momentum``, or AdamW with ``weight_decay``). The
    registry (:mod:`fedcl_dd.registry`) derives flags and configuration keys from these.
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    lr_by_ipc: ClassVar[tuple[tuple[int, float], ...]] = ((1, 1.0),)
    momentum: ClassVar[float] = 0.5
    optimizer: ClassVar[str] = "sgd"  # or "adamw"
    weight_decay: ClassVar[float] = 0.0  # AdamW's (decoupled) weight decay on the images
    default_init: ClassVar[str] = "real"
    private: ClassVar[bool] = False
    projects: ClassVar[bool] = False
    quick: ClassVar[dict[str, Any]] = {}
    paper: ClassVar[str] = ""  # the paper whose published figures this objective compares with

    @classmethod
    def default_lr(cls, ipc: int) -> float:
        """The image learning rate for ``ipc`` images per class: the row at or below ``ipc``."""
        rows = sorted(cls.lr_by_ipc)
        return next((lr for start, lr in reversed(rows) if start <= ipc), rows[0][1])

    @classmethod
    def defaults(cls, plan: Plan) -> dict[str, Any]:
        """Constructor arguments for ``plan`` before the user's options: the declared defaults.

        A subclass adds what depends on the run (MTT's row for the images per class, the
        number of releases a private objective plans its noise for, a cache folder).
        """
        return {o.name: o.default for o in cls.options if o.default is not None}

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` parsed against the declarations; an undeclared one is an :class:`OptionError`."""
        return parse_declared(f"method {cls.name!r}", cls.options, dict(options))

    @classmethod
    def build(cls, options: Mapping[str, Any], plan: Plan) -> Objective:
        """The objective for a run: :meth:`defaults` for ``plan``, overridden by ``options``."""
        return cls(**{**cls.defaults(plan), **cls.check_options(options)})

    def setup(self, ctx: MatchingContext, syn: SyntheticSet) -> None:
        """Run once before the loop (e.g. train or load expert trajectories)."""

    def network(self, ctx: MatchingContext) -> nn.Module:
        """The network for one iteration; by default a fresh one."""
        return ctx.fresh_network()

    def outer_steps(self, syn: SyntheticSet) -> int:
        """How many S updates one network serves (gradient matching: more than one)."""
        return 1

    @abc.abstractmethod
    def loss(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        """The scalar loss whose gradient updates S."""

    def update_network(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> None:
        """Between two S updates on the same network (gradient matching trains it on S)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Extra learnable parameters with their optimizer settings (e.g. a learnable step size)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint besides S (tensors and plain numbers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def report(self) -> dict[str, float]:
        """Figures for results files and progress bars (e.g. privacy spent)."""
        return {}


@runtime_checkable
class PrivateRelease(Protocol):
    """What an objective whose ``private`` is true exposes for accounting its releases: the
    ledger of every Gaussian release so far, the noise and sampling rate of the next (None
    until :meth:`Objective.setup` has set them), and the source of its private draws (which
    the data holder may replace, e.g. by one keyed with a secret of its own)."""

    ledger: PrivacyLedger
    noise_multiplier: float | None
    sample_rate: float | None
    noise_source: PrivateRandom


def class_means(
    emb: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of ``emb`` rows in one batched op: (num_classes, D) means and (num_classes,) counts.

    Classes with no rows get a zero mean and count 0.
    """
    # A one-hot matmul rather than index_add: index_add with repeated indices is serial on CPU.
    # Accumulated in fp32 even under bfloat16 autocast: a mean over hundreds of rows rounded to
    # bf16's 8 bits is what the matching losses then compare.
    emb = emb if emb.dtype == torch.float64 else emb.float()
    with torch.autocast(emb.device.type, enabled=False):
        onehot = torch.nn.functional.one_hot(labels, num_classes).to(emb.dtype)  # (N, classes)
        counts = onehot.sum(0)
        return (onehot.T @ emb) / counts.clamp_min(1).unsqueeze(1), counts
