"""Model pools: networks trained on data while (or before) a synthetic set is distilled.

Plain distribution matching embeds with a freshly initialized network each iteration. Later
members of the family match under networks that have learned something:

* IDM (Zhao et al., "Improved Distribution Matching for Dataset Condensation", CVPR 2023)
  keeps a first-in-first-out queue: it starts with a few random networks, pushes a new one
  every few iterations (at most ``size`` are kept), and each iteration trains a couple of
  queue members for a few SGD steps, so the queue holds networks at every stage of training.
* NCFM (Wang et al., "Dataset Distillation with Neural Characteristic Function", CVPR 2025)
  trains its networks before distilling and, each iteration, matches with one of them
  blended with its own initialization, ``l * theta_init + (1 - l) * theta_trained``,
  ``l ~ U(0, 1)`` (``pool_blend=1``).

:class:`ModelPool` does both, as its :class:`PoolSettings` say. What the networks train on
is a privacy decision (:data:`POOL_DATA`): a network trained on private records leaks them,
so a private objective accepts only networks trained on the synthetic set (whose images come
from private releases alone) or on data the user marks public.

Every draw (which member, which batch, which blend, each augmentation) comes from the
distillation's generator, and :meth:`ModelPool.state_dict` holds the members' weights,
initializations, optimizer momenta and accuracies, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .compiled import compiled_forward
from .models import make_model
from .options import Option

if TYPE_CHECKING:  # the objectives import this module; their context is only annotated here
    from .objectives.base import MatchingContext
    from .synthetic import SyntheticSet

__all__ = ["POOL_DATA", "POOL_OPTIONS", "QUICK_POOL", "ModelPool", "PoolMember", "PoolSettings"]

#: What pool networks may train on: the real data (leaks it), the synthetic set, or public data.
POOL_DATA = ("real", "synthetic", "public")

#: The pool's options, declared once for every objective that uses a pool (each objective
#: resolves the unset ones to its paper's values in its ``defaults``).
POOL_OPTIONS = (
    Option(
        "pool_size",
        int,
        None,
        "most networks the model pool holds (0: a fresh random network every iteration)",
        low=0,
    ),
    Option("pool_init", int, None, "networks in the pool when distillation starts", low=0),
    Option(
        "pool_add_every",
        int,
        None,
        "iterations between new random networks pushed into the pool (0: never)",
        low=0,
    ),
    Option(
        "pool_epochs", int, None, "epochs each starting pool network trains before matching", low=0
    ),
    Option(
        "pool_steps", int, None, "SGD steps each trained pool network takes per iteration", low=0
    ),
    Option("pool_train_nets", int, None, "pool networks trained per iteration", low=0),
    Option("pool_data", str, None, "what pool networks train on", choices=POOL_DATA),
    Option(
        "pool_blend",
        float,
        None,
        "match with a pool network blended with its initialization by a U(0, pool_blend) "
        "share (0: unblended; NCFM: 1)",
        low=0,
        high=1,
    ),
)


@dataclass(frozen=True)
class PoolSettings:
    """How a :class:`ModelPool` is filled, trained and used (see the module for IDM's and NCFM's).

    Networks train with SGD (``lr``, ``momentum``, ``weight_decay``) on batches of
    ``batch_size`` drawn with replacement, augmented per sample when the run augments.
    ``epochs`` counts passes over the training data's size before matching starts.
    """

    size: int
    init: int
    add_every: int = 0
    epochs: int = 0
    steps: int = 0
    train_nets: int = 0
    data: str = "real"
    blend: float = 0.0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(
                f"a model pool needs pool_size >= 1, got {self.size}; "
                "use pool_size=0 to match with fresh random networks instead"
            )
        if not 1 <= self.init <= self.size:
            raise ValueError(
                f"pool_init must lie in [1, pool_size={self.size}], got {self.init}; "
                "the pool starts with pool_init networks and holds at most pool_size"
            )
        for name in ("add_every", "epochs", "steps", "train_nets"):
            if getattr(self, name) < 0:
                raise ValueError(f"pool_{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.blend <= 1:
            raise ValueError(f"pool_blend must lie in [0, 1], got {self.blend}")
        if self.data not in POOL_DATA:
            raise ValueError(f"pool_data must be one of {list(POOL_DATA)}, got {self.data!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.batch_size < 1:
            raise ValueError(
                f"pool training needs lr > 0 and batch_size >= 1, got {self.lr} and {self.batch_size}"
            )

    @property
    def trains(self) -> bool:
        """Whether any pool network ever sees training data."""
        return self.epochs > 0 or (self.steps > 0 and self.train_nets > 0)

    def options(self) -> dict[str, Any]:
        """These settings as the ``pool_*`` options :meth:`from_options` reads."""
        return {
            "pool_size": self.size,
            "pool_init": self.init,
            "pool_add_every": self.add_every,
            "pool_epochs": self.epochs,
            "pool_steps": self.steps,
            "pool_train_nets": self.train_nets,
            "pool_data": self.data,
            "pool_blend": self.blend,
        }

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> PoolSettings | None:
        """Settings from resolved ``pool_*`` options; None when ``pool_size`` is 0 (no pool)."""
        if not options.get("pool_size"):
            return None
        return cls(
            size=options["pool_size"],
            init=options["pool_init"],
            add_every=options["pool_add_every"],
            epochs=options["pool_epochs"],
            steps=options["pool_steps"],
            train_nets=options["pool_train_nets"],
            data=options["pool_data"],
            blend=options["pool_blend"],
        )


#: The pooled objectives' ``quick`` pool (their own data and blend kept): trained once before
#: matching (every pool code path runs in tests/test_pool.py); networks that keep training move
#: the loss, which then says little in the contract test's 12 iterations.
QUICK_POOL = {
    k: v
    for k, v in PoolSettings(size=2, init=2, epochs=1).options().items()
    if k not in ("pool_data", "pool_blend")
}


@dataclass
class PoolMember:
    """One pool network: its weights, its initialization (kept for blending), its optimizer and
    its accuracy on the batches of its latest training (NaN before any)."""

    net: nn.Module
    init: dict[str, torch.Tensor]
    optimizer: torch.optim.SGD
    accuracy: float = math.nan


class ModelPool:
    """A pool of networks for a matching objective; see the module.

    Call :meth:`advance` once per iteration (it builds the pool on its first call), then
    :meth:`pick` a member and :meth:`matching_network` for the network to match with.
    """

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.members: list[PoolMember] = []
        self.iteration = 0
        self._pending: dict[str, Any] | None = None  # a loaded state, applied once built

    # --- the pool's life -------------------------------------------------------------------
    def advance(self, ctx: MatchingContext, syn: SyntheticSet) -> None:
        """One iteration: build the pool (first call), push a new network when due, train some."""
        s = self.settings
        fresh = not self.members and self._pending is None
        if not self.members:
            self._build(ctx, syn)
        # A restored pool is due its push as the uninterrupted run was; a fresh one is not.
        if not fresh and s.add_every and self.iteration % s.add_every == 0:
            self.members.append(self._new_member(ctx))
            if len(self.members) > s.size:
                self.members.pop(0)
        self.iteration += 1
        if s.steps and s.train_nets:
            x, y = self._data(ctx, syn)
            picks = torch.randint(len(self.members), (s.train_nets,), generator=ctx.generator)
            for i in picks.tolist():
                self._train(ctx, self.members[i], x, y, s.steps)

    def pick(self, ctx: MatchingContext) -> PoolMember:
        """A member drawn uniformly."""
        return self.members[int(torch.randint(len(self.members), (1,), generator=ctx.generator))]

    def matching_network(
        self, ctx: MatchingContext, member: PoolMember, blend: bool = True
    ) -> nn.Module:
        """The network to match with: a frozen copy of ``member`` in eval mode, blended with its
        initialization by a U(0, ``settings.blend``) share drawn per call (never with
        ``blend=False``)."""
        net = copy.deepcopy(member.net)
        if blend and self.settings.blend:
            share = self.settings.blend * float(torch.rand((), generator=ctx.generator))
            with torch.no_grad():
                for name, p in net.named_parameters():
                    p.mul_(1 - share).add_(member.init[name].to(p), alpha=share)
        return net.eval().requires_grad_(False)

    def _build(self, ctx: MatchingContext, syn: SyntheticSet) -> None:
        s = self.settings
        if self._pending is not None:
            self._restore(ctx, self._pending)
            self._pending = None
            return
        self.members = [self._new_member(ctx) for _ in range(s.init)]
        if s.epochs:
            x, y = self._data(ctx, syn)
            steps = s.epochs * math.ceil(x.shape[0] / s.batch_size)
            for member in tqdm(self.members, desc="model pool", disable=None, leave=False):
                self._train(ctx, member, x, y, steps)

    def _new_member(self, ctx: MatchingContext) -> PoolMember:
        net = ctx.fresh_network()
        init = {n: p.detach().clone() for n, p in net.named_parameters()}
        return PoolMember(net, init, self._optimizer(net))

    def _optimizer(self, net: nn.Module) -> torch.optim.SGD:
        s = self.settings
        return torch.optim.SGD(
            net.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
        )

    def _data(self, ctx: MatchingContext, syn: SyntheticSet) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and targets pool networks train on (``settings.data``)."""
        data = self.settings.data
        if data == "synthetic":
            with torch.no_grad():
                return syn.images().detach(), syn.targets().detach()
        source = ctx.real if data == "real" else ctx.public
        if source is None:
            raise ValueError(
                "pool_data='public' needs public data: pass public=ClassSampler(...) to the "
                "Distillation (data you may disclose), or use pool_data='synthetic'"
            )
        if source.y.numel() == 0:
            raise ValueError(f"the pool's {data} data holds no samples to train on")
        return source.x, source.y

    def _train(
        self,
        ctx: MatchingContext,
        member: PoolMember,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
    ) -> None:
        """``steps`` SGD steps on random batches; records the accuracy on those batches."""
        net, opt, n = member.net, member.optimizer, x.shape[0]
        # Compiled, the pool's training calls the process-wide compiled forward: members stay
        # plain modules, so the matching copies carry no compiled code along.
        forward = compiled_forward(ctx.compile) if ctx.compile else type(net).__call__
        net.train()
        correct = seen = 0
        for _ in range(steps):
            idx = torch.randint(n, (min(n, self.settings.batch_size),), generator=ctx.generator)
            xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
            if ctx.augment is not None:
                xb = ctx.augment(xb)
            logits = forward(net, xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hard = yb.argmax(1) if yb.is_floating_point() else yb
            correct += int((logits.detach().argmax(1) == hard).sum())
            seen += yb.shape[0]
        opt.zero_grad(set_to_none=True)  # no stale gradients copied with the matching network
        member.accuracy = correct / max(1, seen)

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data: every member's weights, initialization, optimizer state and accuracy.

        A pool not built yet returns the state it was loaded with, if any."""
        if not self.members:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "iteration": self.iteration,
            "nets": [m.net.state_dict() for m in self.members],
            "inits": [m.init for m in self.members],
            "optimizers": [m.optimizer.state_dict() for m in self.members],
            "accuracies": [m.accuracy for m in self.members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the networks are rebuilt on the next
        :meth:`advance` (which then neither draws nor trains new ones)."""
        self.members = []
        self._pending = state if state else None

    def _restore(self, ctx: MatchingContext, state: dict[str, Any]) -> None:
        spec = ctx.spec
        self.iteration = int(state["iteration"])
        self.members = []
        for weights, init, opt_state, acc in zip(
            state["nets"], state["inits"], state["optimizers"], state["accuracies"], strict=True
        ):
            # The architecture only: the weights come from the state (no draw from ctx's streams).
            net = make_model(ctx.model, spec.channels, spec.num_classes, spec.image_size)
            net = net.to(ctx.device)
            net.load_state_dict(weights)
            opt = self._optimizer(net)
            opt.load_state_dict(opt_state)
            init = {k: v.to(ctx.device) for k, v in init.items()}
            self.members.append(PoolMember(net, init, opt, float(acc)))
