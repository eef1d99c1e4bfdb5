"""Distribution matching (Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023).

Each iteration samples a freshly initialized network, freezes it, and matches,
class by class, the mean embedding of a real batch to the mean embedding of the
class's synthetic images (squared L2), both augmented with the same DSA draw.
All classes go through the network in one batched forward pass per side.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..augment import AugParams
from ..models import embed
from ..options import Option
from ..synthetic import SyntheticSet
from .base import REAL_PER_CLASS, MatchingContext, Objective, class_means

__all__ = ["DistributionMatching"]

# On CPU the elementwise layers (norm, ReLU, pooling) are bound by memory bandwidth: a
# 16-image chunk keeps each layer's activations in cache (~20% faster forward than one
# 640-image batch here). On a GPU one large batch is best.
_CPU_CHUNK = 16


def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x.split(_CPU_CHUNK) if x.device.type == "cpu" else (x,)


class DistributionMatching(Objective):
    """DM: ``sum_c || mean_real_c(embed) - mean_syn_c(embed) ||^2`` under a random frozen network."""

    name = "dm"
    options: ClassVar[tuple[Option, ...]] = (REAL_PER_CLASS,)
    # The DM code's image learning rates.
    lr_by_ipc: ClassVar[tuple[tuple[int, float], ...]] = ((1, 1.0), (100, 10.0))
    quick = {"real_per_class": 16}
    paper = "dm"

    def __init__(self, real_per_class: int = 256) -> None:
        if real_per_class < 1:
            raise ValueError(f"real_per_class must be >= 1, got {real_per_class}")
        self.real_per_class = real_per_class

    def network(self, ctx: MatchingContext) -> nn.Module:
        # The network is only a random feature map: no weight gradients are needed, which
        # makes the backward pass compute input gradients alone. Channels-last weights make
        # the activations channels-last too, where oneDNN's forward convolutions and pooling
        # run faster on CPU (forward ~18% here; it slows weight-gradient training, hence DM only).
        return ctx.fresh_network().requires_grad_(False).to(memory_format=torch.channels_last)

    def real_means(
        self, ctx: MatchingContext, net: nn.Module, classes: list[int], params: AugParams | None
    ) -> torch.Tensor:
        """Mean embedding of a fresh real batch per class, (num_classes, D); no graph."""
        x, y = ctx.real.sample_classes(classes, self.real_per_class, ctx.generator)
        with torch.no_grad():
            emb = torch.cat([embed(net, ctx.apply(part, params)) for part in _chunks(x)])
        return class_means(emb, y, ctx.spec.num_classes)[0]

    def loss(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        classes = syn.classes
        params = ctx.siamese()
        real = self.real_means(ctx, net, classes, params)
        emb = embed(net, ctx.apply(syn.images(), params))
        fake, _ = class_means(emb, syn.class_ids, ctx.spec.num_classes)
        held = torch.tensor(classes, device=emb.device)
        return ((real[held] - fake[held]) ** 2).sum()
