"""Improved distribution matching (Zhao et al., "Improved Distribution Matching for Dataset
Condensation", CVPR 2023).

DM's loss under networks from a model pool that is trained on the real data as distillation
goes (:mod:`fedcl_dd.pool`: start with 3 random networks, push a new one every 30 iterations,
5 at one image per class, keep at most 100; each iteration 2 of them take 10 SGD steps), plus
a class-aware regularizer: the cross-entropy of the synthetic images under the matching
network, weighted by that network's training accuracy in percent times ``ce_weight`` (0.5,
0.1 from 50 images per class). Images: SGD at lr 0.2, momentum 0.5. IDM's "partition and
expansion" (four half-resolution images in each stored one) is the multi-formation
parameterization: ``param="multi", factor=2``.

Its networks learn from the real data, so its sets are not private: the private objective
(``dm-dp``) accepts only pools trained on the synthetic set or on public data.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..options import Option
from ..pool import POOL_OPTIONS, QUICK_POOL, PoolSettings
from ..synthetic import SyntheticSet
from .base import REAL_PER_CLASS, MatchingContext, Plan
from .dm import SYN_PER_CLASS, DistributionMatching

__all__ = ["ImprovedDistributionMatching"]

CE_WEIGHT = Option(
    "ce_weight",
    float,
    None,
    "IDM's class-aware regularizer: cross-entropy of S under the matching network, times its "
    "training accuracy in percent, times this",
    low=0,
)


class ImprovedDistributionMatching(DistributionMatching):
    """IDM: DM under a pool of partially trained networks, plus the class-aware regularizer."""

    name = "idm"
    options: ClassVar[tuple[Option, ...]] = (
        REAL_PER_CLASS,
        SYN_PER_CLASS,
        *POOL_OPTIONS,
        CE_WEIGHT,
    )
    lr_by_ipc: ClassVar[tuple[tuple[int, float], ...]] = ((1, 0.2),)
    quick = {
        "real_per_class": 16,
        **QUICK_POOL,
    }
    paper = "idm"

    @classmethod
    def defaults(cls, plan: Plan) -> dict[str, Any]:
        """IDM's settings (its ``command.txt``), by images per class."""
        return {
            **super().defaults(plan),
            **PoolSettings(
                size=100, init=3, add_every=5 if plan.ipc <= 1 else 30, steps=10, train_nets=2
            ).options(),
            "ce_weight": 0.1 if plan.ipc >= 50 else 0.5,
        }

    def __init__(
        self,
        real_per_class: int = 256,
        ce_weight: float = 0.5,
        syn_per_class: int = 0,
        **pool_options: Any,
    ) -> None:
        settings = PoolSettings.from_options(pool_options)
        if ce_weight < 0 or not math.isfinite(ce_weight):
            raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight}")
        if ce_weight and (settings is None or not settings.trains):
            raise ValueError(
                f"ce_weight={ce_weight:g} weighs the synthetic set's cross-entropy by a pool "
                "network's training accuracy, but no pool network trains; give the pool "
                "pool_steps and pool_train_nets (or pool_epochs), or set ce_weight=0"
            )
        super().__init__(real_per_class, settings, syn_per_class)
        self.ce_weight = ce_weight

    def loss(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        loss = super().loss(ctx, net, syn)
        member = self.member
        if self.ce_weight and member is not None and not math.isnan(member.accuracy):
            images, _, targets = self.synthetic_batch(ctx, syn)
            logits = net(ctx.apply(images, ctx.siamese()))
            weight = self.ce_weight * 100 * member.accuracy
            loss = loss + weight * F.cross_entropy(logits, targets)
        return loss
