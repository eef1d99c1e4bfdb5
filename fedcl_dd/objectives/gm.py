"""Gradient matching: DC (Zhao, Mopuri & Bilen, "Dataset Condensation with Gradient Matching",
ICLR 2021) and, with augmentation in the context, DSA (Zhao & Bilen, "Dataset Condensation with
Differentiable Siamese Augmentation", ICML 2021).

Each iteration samples a fresh network. In each of its ``outer_loop`` steps, for every class the
synthetic set holds, the gradient of the cross-entropy loss with respect to the network's
parameters on a real batch of the class is matched to the gradient on the class's synthetic
images (both under the same siamese DSA draw); the distances are summed over classes. Between two
outer steps the network trains on the synthetic set for ``inner_loop`` epochs (SGD, lr 0.01,
momentum 0.5, batch 256, as in the DC code), so later steps match gradients of a network that has
moved along the synthetic set's own training trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate import train_epochs
from ..options import Option
from ..synthetic import SyntheticSet
from .base import REAL_PER_CLASS, MatchingContext, Objective

__all__ = ["DISTANCES", "LOOPS", "GradientMatching", "gradient_distance", "loops_for_ipc"]

DISTANCES = ("layerwise", "mse", "cosine")

# (images per class, outer_loop, inner_loop): the DC paper's schedule.
LOOPS: tuple[tuple[int, int, int], ...] = (
    (1, 1, 1),
    (10, 10, 50),
    (20, 20, 25),
    (30, 30, 20),
    (40, 40, 15),
    (50, 50, 10),
)

# Only guards all-zero rows. DC adds 1e-6 to the product of the norms instead, which on small
# images (digits' third block has gradient rows of norm ~1e-3) leaves a distance of ~0.5 per row
# between identical gradients.
_EPS = 1e-8


def loops_for_ipc(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for ``ipc`` images per class: the schedule row at or below ``ipc``.

    The DC code exits on other values; sizes between rows take the row below (5 -> (1, 1),
    15 -> (10, 50)) and sizes above 50 take the last row.
    """
    if ipc < 1:
        raise ValueError(f"images per class must be >= 1, got {ipc}")
    outer, inner = LOOPS[0][1:]
    for row_ipc, row_outer, row_inner in LOOPS:
        if row_ipc <= ipc:
            outer, inner = row_outer, row_inner
    return outer, inner


def gradient_distance(
    syn: Sequence[torch.Tensor], real: Sequence[torch.Tensor], kind: str = "layerwise"
) -> torch.Tensor:
    """Distance between two lists of parameter gradients (same order and shapes).

    ``layerwise`` (DC's own): every gradient with more than one dimension becomes
    (out, rest) and contributes the sum over output rows of 1 - cosine; 1-D gradients
    (biases, norm affines) are skipped. ``mse``: squared L2 of the concatenated flattened
    gradients. ``cosine``: 1 - cosine of the concatenated flattened gradients.
    """
    if kind == "layerwise":
        total = syn[0].new_zeros(())
        for gs, gr in zip(syn, real, strict=True):
            if gs.dim() < 2:
                continue
            total = (
                total
                + (1 - F.cosine_similarity(gs.flatten(1), gr.flatten(1), dim=1, eps=_EPS)).sum()
            )
        return total
    gs = torch.cat([g.flatten() for g in syn])
    gr = torch.cat([g.flatten() for g in real])
    if kind == "mse":
        return ((gs - gr) ** 2).sum()
    if kind == "cosine":
        return 1 - F.cosine_similarity(gs, gr, dim=0, eps=_EPS)
    raise ValueError(f"unknown gradient distance {kind!r}; choose one of {DISTANCES}")


class GradientMatching(Objective):
    """DC/DSA: ``sum_c D(grad_theta CE(real_c), grad_theta CE(syn_c))`` on a network trained on S.

    ``distance`` is ``layerwise`` (default), ``mse`` or ``cosine`` (:func:`gradient_distance`).
    ``outer_loop``/``inner_loop`` override the paper's schedule (:func:`loops_for_ipc`, chosen
    by the largest number of images any class holds). ``lr_net``, ``momentum_net`` and
    ``batch_net`` set the network's training on S between outer steps. The DC paper's image
    optimizer is SGD with lr 0.1 and momentum 0.5.

    Batch-norm models see the synthetic classes in train mode (DC froze their statistics on a
    real batch first); the default ConvNet uses instance norm, which needs no such care.
    """

    name = "gm"
    options = (
        REAL_PER_CLASS,
        Option("distance", str, "layerwise", "gradient distance", choices=DISTANCES),
        Option(
            "outer_loop",
            int,
            None,
            "S updates per network (default: DC's schedule by images per class)",
            low=1,
        ),
        Option(
            "inner_loop",
            int,
            None,
            "epochs on S between outer steps (default: DC's schedule)",
            low=1,
        ),
        Option(
            "lr_net",
            float,
            0.01,
            "learning rate of the network's training on S",
            low=0,
            open_low=True,
        ),
        Option(
            "momentum_net", float, 0.5, "momentum of the network's training on S", low=0, high=1
        ),
        Option("batch_net", int, 256, "batch size of the network's training on S", low=1),
    )
    lr_by_ipc = ((1, 0.1),)  # DC/DSA
    quick = {"real_per_class": 8, "outer_loop": 2, "inner_loop": 1}
    paper = "dsa"  # DC with DSA, as the loop applies it

    def __init__(
        self,
        real_per_class: int = 256,
        distance: str = "layerwise",
        outer_loop: int | None = None,
        inner_loop: int | None = None,
        lr_net: float = 0.01,
        momentum_net: float = 0.5,
        batch_net: int = 256,
    ) -> None:
        if real_per_class < 1:
            raise ValueError(f"real_per_class must be >= 1, got {real_per_class}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown gradient distance {distance!r}; choose one of {DISTANCES}")
        for label, value in (("outer_loop", outer_loop), ("inner_loop", inner_loop)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if not lr_net > 0 or batch_net < 1:
            raise ValueError(f"lr_net must be > 0 and batch_net >= 1, got {lr_net} and {batch_net}")
        self.real_per_class = real_per_class
        self.distance = distance
        self.outer_loop = outer_loop
        self.inner_loop = inner_loop
        self.lr_net = lr_net
        self.momentum_net = momentum_net
        self.batch_net = batch_net
        # The network of the current iteration and its optimizer: DC keeps one optimizer (and
        # its momentum) for a network across all of its outer steps.
        self._net: nn.Module | None = None
        self._net_optimizer: torch.optim.Optimizer | None = None

    def loops(self, syn: SyntheticSet) -> tuple[int, int]:
        """(outer_loop, inner_loop) for ``syn``: the overrides, else the paper's schedule."""
        outer, inner = loops_for_ipc(int(syn.counts().max()))
        return self.outer_loop or outer, self.inner_loop or inner

    def network(self, ctx: MatchingContext) -> nn.Module:
        # Weight gradients are the matched quantity, and the network trains between outer steps.
        return ctx.fresh_network().requires_grad_(True).train()

    def outer_steps(self, syn: SyntheticSet) -> int:
        return self.loops(syn)[0]

    def _matched(self, net: nn.Module) -> list[nn.Parameter]:
        params = [p for p in net.parameters() if p.requires_grad]
        # layerwise ignores 1-D parameters: not differentiating for them saves their work.
        return [p for p in params if p.dim() > 1] if self.distance == "layerwise" else params

    def loss(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        params = self._matched(net)
        classes = syn.classes
        images, targets, class_ids = syn.images(), syn.targets(), syn.class_ids
        real_x, real_y = ctx.real.sample_classes(classes, self.real_per_class, ctx.generator)
        total = images.new_zeros(())
        for c in classes:
            aug = ctx.siamese()
            rows = real_y == c  # up to real_per_class rows (all of a smaller class)
            real_loss = F.cross_entropy(net(ctx.apply(real_x[rows], aug)), real_y[rows])
            g_real = torch.autograd.grad(real_loss, params)
            mine = class_ids == c
            syn_loss = F.cross_entropy(net(ctx.apply(images[mine], aug)), targets[mine])
            g_syn = torch.autograd.grad(syn_loss, params, create_graph=True)
            total = total + gradient_distance(g_syn, g_real, self.distance)
        return total

    def update_network(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> None:
        if self._net is not net or self._net_optimizer is None:
            self._net = net
            self._net_optimizer = torch.optim.SGD(
                net.parameters(), lr=self.lr_net, momentum=self.momentum_net
            )
        with torch.no_grad():
            images, targets = syn.images(), syn.targets()
        epochs, aug = self.loops(syn)[1], ctx.augment
        train_epochs(
            net, self._net_optimizer, images, targets, epochs, self.batch_net, aug, ctx.generator
        )
