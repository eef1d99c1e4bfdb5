"""Distribution matching (Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023).

Each iteration samples a freshly initialized network, freezes it, and matches,
class by class, the mean embedding of a real batch to the mean embedding of the
class's synthetic images (squared L2), both augmented with the same DSA draw.
All classes go through the network in one batched forward pass per side.

Subclasses (IDM, NCFM, dm-dp) may match with networks from a :class:`~fedcl_dd.pool.ModelPool`
instead; plain DM never does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..augment import AugParams
from ..compiled import compile_embedding
from ..models import embed
from ..options import Option
from ..pool import ModelPool, PoolMember, PoolSettings
from ..synthetic import SyntheticSet
from .base import REAL_PER_CLASS, MatchingContext, Objective, class_means

__all__ = ["SYN_PER_CLASS", "DistributionMatching", "embed_augmented"]

# On CPU the elementwise layers (norm, ReLU, pooling) are bound by memory bandwidth: a
# 16-image chunk keeps each layer's activations in cache (~20% faster forward than one
# 640-image batch here). On a GPU one large batch is best.
_CPU_CHUNK = 16


def embed_augmented(
    ctx: MatchingContext, net: nn.Module, x: torch.Tensor, params: AugParams | None
) -> torch.Tensor:
    """``embed(net, ctx.apply(x, params))``, on CPU in chunks of ``_CPU_CHUNK`` images.

    Both sides go in chunks: the synthetic side's backward through each chunk's norm and ReLU
    then also works on cache-sized activations (500 MNIST images forward and backward: 1.7 s
    chunked against 2.4 s whole, measured). The siamese draw broadcasts over any chunk.
    """
    parts = x.split(_CPU_CHUNK) if x.device.type == "cpu" else (x,)
    return torch.cat([embed(net, ctx.apply(part, params)) for part in parts])


SYN_PER_CLASS = Option(
    "syn_per_class",
    int,
    0,
    "synthetic images per class matched each iteration, drawn anew (0: all of them)",
    low=0,
)


class DistributionMatching(Objective):
    """DM: ``sum_c || mean_real_c(embed) - mean_syn_c(embed) ||^2`` under a random frozen network."""

    name = "dm"
    options: ClassVar[tuple[Option, ...]] = (REAL_PER_CLASS, SYN_PER_CLASS)
    # The DM code's image learning rates.
    lr_by_ipc: ClassVar[tuple[tuple[int, float], ...]] = ((1, 1.0), (100, 10.0))
    quick = {"real_per_class": 16}
    paper = "dm"

    def __init__(
        self, real_per_class: int = 256, pool: PoolSettings | None = None, syn_per_class: int = 0
    ) -> None:
        if real_per_class < 1:
            raise ValueError(f"real_per_class must be >= 1, got {real_per_class}")
        if syn_per_class < 0:
            raise ValueError(f"syn_per_class must be >= 0 (0: all), got {syn_per_class}")
        self.real_per_class = real_per_class
        self.syn_per_class = syn_per_class
        self.pool = ModelPool(pool) if pool is not None else None
        self.member: PoolMember | None = None  # the pool network this iteration matches with
        self._syn: SyntheticSet | None = None

    def setup(self, ctx: MatchingContext, syn: SyntheticSet) -> None:
        self._syn = syn  # a pool may train on it (optimized in place, so this stays current)

    def network(self, ctx: MatchingContext) -> nn.Module:
        if self.pool is None:
            net = ctx.fresh_network().requires_grad_(False)
        else:
            assert self._syn is not None, "setup(ctx, syn) runs before the first network"
            self.pool.advance(ctx, self._syn)
            self.member = self.pool.pick(ctx)
            net = self.pool.matching_network(ctx, self.member)
        # The network is only a feature map: no weight gradients are needed, which makes the
        # backward pass compute input gradients alone. Eager on CPU it stays contiguous (NCHW):
        # oneDNN's convolutions run as fast there as channels-last, and PyTorch's GroupNorm
        # runs up to 17x slower channels-last (16x16x128 maps, fp32; worse in bf16), while
        # models.AvgPool2x2 pools the contiguous layout fast. Compiled runs stay channels-last
        # (contiguous measured 3-10% slower there); GPU runs keep it too (not measured).
        eager_cpu = ctx.device.type == "cpu" and not ctx.compile
        layout = torch.contiguous_format if eager_cpu else torch.channels_last
        net = net.to(memory_format=layout)
        return compile_embedding(net, ctx.compile) if ctx.compile else net

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict()} if self.pool is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.pool is not None:
            self.pool.load_state_dict(state.get("pool", {}))

    def real_means(
        self, ctx: MatchingContext, net: nn.Module, classes: list[int], params: AugParams | None
    ) -> torch.Tensor:
        """Mean embedding of a fresh real batch per class, (num_classes, D); no graph."""
        x, y = ctx.real.sample_classes(classes, self.real_per_class, ctx.generator)
        with torch.no_grad():
            emb = embed_augmented(ctx, net, x, params)
        return class_means(emb, y, ctx.spec.num_classes)[0]

    def synthetic_batch(
        self, ctx: MatchingContext, syn: SyntheticSet
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The synthetic images matched this iteration, their class ids and their targets: all
        of them, or ``syn_per_class`` of each class drawn from the run's generator (only those
        images are built: an addressing memory of thousands costs what the batch costs)."""
        counts = syn.counts()
        if not self.syn_per_class or self.syn_per_class >= int(counts.max()):
            return syn.images(), syn.class_ids, syn.targets()
        ids = syn.class_ids
        picks = []
        for c in syn.classes:
            idx = (ids == c).nonzero().squeeze(1)
            order = torch.randperm(idx.numel(), generator=ctx.generator)[: self.syn_per_class]
            picks.append(idx[order.to(idx.device)])
        index = torch.cat(picks)
        return syn.images_at(index), ids[index], syn.targets()[index]

    def loss(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        classes = syn.classes
        params = ctx.siamese()
        real = self.real_means(ctx, net, classes, params)
        images, ids, _ = self.synthetic_batch(ctx, syn)
        emb = embed_augmented(ctx, net, images, params)
        fake, _ = class_means(emb, ids, ctx.spec.num_classes)
        held = torch.tensor(classes, device=emb.device)
        return ((real[held] - fake[held]) ** 2).sum()
