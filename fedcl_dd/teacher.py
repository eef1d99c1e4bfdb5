"""Soft labels from a teacher: a network trained on the real data labels the distilled images.

A synthetic image often sits between classes; a one-hot label throws that away. Training a
teacher on the real data and storing its softened predictions on the synthetic images as
their labels (knowledge distillation, Hinton et al. 2015, as used for distilled sets since
SRe2L, Yin et al., NeurIPS 2023) gives the student that information. The labels are stored
with the set (``label_logits``, ``num_classes`` values per image at the storage dtype) and
counted in its bytes: a recipe with a teacher plans fewer images, so that images and labels
together fit its budget (:meth:`~fedcl_dd.recipe.Recipe.image_budget`).

A teacher trained on private records leaks them: private methods refuse teacher labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .augment import DSA
from .data import DatasetSpec
from .evaluate import train_model
from .models import make_model
from .sampling import ClassSampler
from .synthetic import SyntheticSet

__all__ = ["label_by_teacher", "train_teacher"]


def train_teacher(
    real: ClassSampler,
    spec: DatasetSpec,
    epochs: int,
    model: str = "convnet",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A fresh ``model`` trained on all of ``real`` for ``epochs`` by the evaluation protocol's
    recipe (SGD, lr 0.01 divided by 10 at half, DSA), in eval mode."""
    if epochs < 1:
        raise ValueError(f"a teacher needs epochs >= 1, got {epochs}")
    device = torch.device(device) if device is not None else real.device
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    net = make_model(model, spec.channels, spec.num_classes, spec.image_size, gen, device)
    augment = DSA(spec.dsa_strategy, gen)
    train_model(net, real.x, real.y, epochs, augment=augment, generator=gen)
    return net.eval()


@torch.no_grad()
def label_by_teacher(
    syn: SyntheticSet, teacher: nn.Module, temperature: float = 1.0, batch_size: int = 512
) -> None:
    """Give ``syn`` soft labels: ``softmax(teacher(image) / temperature)`` for every image."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    images = syn.images().detach()
    logits = torch.cat([teacher(part.to(device)) for part in images.split(batch_size)])
    teacher.train(was_training)
    log_probs = F.log_softmax(logits.float() / temperature, dim=1)
    syn.label_logits = nn.Parameter(log_probs.to(syn.class_ids.device))
