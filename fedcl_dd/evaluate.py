"""Evaluating synthetic sets by the standard protocol of DSA/DM.

Train fresh networks on the synthetic set only (SGD, momentum 0.9, weight decay
5e-4, lr 0.01 divided by 10 at half of the epochs, batch 256, DSA augmentation at
train time), test each once at the end on the real test set, and report mean and
standard deviation over the networks. The test set never chooses a checkpoint.

:func:`train_model` is the training half on its own: the Flower server trains
the global model on the union of uploaded sets with it, and continual plugins
retrain on their buffer with it.

``precision="bf16"`` trains and tests under bfloat16 autocast where the device computes it
natively (:mod:`fedcl_dd.precision`); the loss, the weights and the optimizer stay fp32.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .augment import DSA
from .compiled import compile_embedding, has_compiled_embedding
from .data import DatasetSpec
from .models import make_model
from .precision import Precision
from .progress import StepBar
from .synthetic import SyntheticSet

__all__ = ["EvalResult", "accuracy", "evaluate", "train_epochs", "train_model"]


@dataclass
class EvalResult:
    """Test accuracies of networks trained on a synthetic set."""

    accuracies: list[float]
    model: str
    epochs: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} % ({self.model}, {len(self.accuracies)} nets)"


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    batch_size: int = 256,
    augment: DSA | None = None,
    generator: torch.Generator | None = None,
    precision: str | Precision = "fp32",
    on_epoch: Callable[[], None] | None = None,
) -> nn.Module:
    """Train ``model`` with ``optimizer`` at its current learning rate for ``epochs`` shuffled epochs.

    There is no learning-rate schedule and the optimizer is the caller's, so momentum carries
    over between calls (DC keeps one network optimizer across all outer steps; MTT snapshots
    experts after every epoch).
    ``targets`` are class ids or (N, classes) probabilities; augmentation draws per sample.
    ``precision`` is ``"fp32"`` or ``"bf16"`` (autocast of the forward pass and the loss);
    ``on_epoch`` is called after every epoch (a progress bar's step).
    """
    device = images.device
    mode = Precision.resolve(precision, device)
    images, targets = images.detach(), targets.detach()
    n = images.shape[0]
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for batch in order.split(batch_size):
            x = images[batch]
            if augment is not None:
                x = augment(x)
            with mode.autocast():
                # Autocast computes cross-entropy in fp32 from bf16 logits; backward stays outside.
                loss = F.cross_entropy(model(x), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch()
    return model


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    augment: DSA | None = None,
    generator: torch.Generator | None = None,
    precision: str | Precision = "fp32",
    on_epoch: Callable[[], None] | None = None,
) -> nn.Module:
    """Train ``model`` on ``(images, targets)``; lr drops tenfold at half of the epochs.

    ``targets`` are int64 class ids or (N, classes) probabilities (soft labels); ``precision``
    is ``"fp32"`` or ``"bf16"`` and ``on_epoch`` is called after every epoch
    (:func:`train_epochs`).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = next(model.parameters()).device
    mode = Precision.resolve(precision, device)  # resolved once for both halves
    images, targets = images.detach().to(device), targets.detach().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    first = max(1, epochs // 2)

    def run(n: int) -> None:  # n epochs at the optimizer's current learning rate
        train_epochs(model, opt, images, targets, n, batch_size, augment, generator, mode, on_epoch)

    run(first)
    if epochs > first:
        for group in opt.param_groups:
            group["lr"] = lr / 10
        run(epochs - first)
    return model


@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
    precision: str | Precision = "fp32",
) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (forward under ``precision``)."""
    device = next(model.parameters()).device
    mode = Precision.resolve(precision, device)
    was_training = model.training
    model.eval()
    # Forward-only, oneDNN's convolutions run faster on channels-last weights on CPU (a
    # ConvNet's test pass on MNIST: 1.1 against 1.8 ms per image, measured), while training
    # runs slower in that layout (3.7 against 3.4): so only for this pass, and back after.
    # Not for a compiled network (a layout change would recompile it) nor eager bf16 (slow
    # GroupNorm in that layout, see DistributionMatching.network).
    relayout = (
        device.type == "cpu"
        and not mode.active
        and not has_compiled_embedding(model)
        and any(p.dim() == 4 for p in model.parameters())
    )
    if relayout:
        model.to(memory_format=torch.channels_last)
    correct = 0
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            with mode.autocast():
                logits = model(xb)
            correct += int((logits.argmax(1) == y[start : start + batch_size].to(device)).sum())
    finally:
        if relayout:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return correct / max(1, x.shape[0])


def evaluate(
    syn: SyntheticSet | tuple[torch.Tensor, torch.Tensor],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    spec: DatasetSpec,
    model: str = "convnet",
    num_models: int = 3,
    epochs: int = 300,
    augment: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    lr: float = 0.01,
    precision: str | Precision = "fp32",
    compile: str | None = None,
    progress: bool = False,
    bar: bool | None = None,
) -> EvalResult:
    """Train ``num_models`` fresh ``model`` networks on ``syn`` and test each on ``(test_x, test_y)``.

    ``syn`` is a synthetic set or an ``(images, targets)`` pair (e.g. a random real
    subset, the usual baseline). Seeds ``seed .. seed+num_models-1`` fix each network's
    initialization, data order and augmentation. ``precision="bf16"`` trains and tests under
    bfloat16 autocast (falling back to fp32, with one warning, where the device lacks it).
    ``compile`` (a :mod:`fedcl_dd.compiled` mode; None, the default: eager) trains and tests
    the networks with compiled embeddings, compiled once for all of them. With ``progress``,
    an evaluation expected to last over a minute says so on stderr after its first epochs,
    and ``bar`` shows a bar over every epoch of every network (None: on a terminal only).
    """
    if num_models < 1:
        raise ValueError(f"num_models must be >= 1, got {num_models}")
    if isinstance(syn, SyntheticSet):
        with torch.no_grad():
            images, targets = syn.images().detach(), syn.targets().detach()
    else:
        images, targets = syn
    device = torch.device(device) if device is not None else images.device
    mode = Precision.resolve(precision, device)
    start = time.perf_counter()
    accs = []
    # tqdm's disable=None hides the bar off a terminal.
    steps = (
        StepBar(num_models * epochs, f"evaluate {model}", "epoch", None if bar is None else not bar)
        if progress
        else None
    )
    for k in range(num_models):
        gen = torch.Generator().manual_seed(seed + k)
        net = make_model(model, spec.channels, spec.num_classes, spec.image_size, gen, device)
        if compile is not None:
            compile_embedding(net, compile)
        aug = DSA(spec.dsa_strategy, generator=gen) if augment else None
        train_model(
            net,
            images,
            targets,
            epochs,
            lr=lr,
            batch_size=batch_size,
            augment=aug,
            generator=gen,
            precision=mode,
            on_epoch=steps.step if steps is not None else None,
        )
        accs.append(accuracy(net, test_x, test_y, precision=mode))
    if steps is not None:
        steps.close()
    extra = {"precision": "bf16"} if mode.active else {}
    return EvalResult(accs, model, epochs, time.perf_counter() - start, extra)
