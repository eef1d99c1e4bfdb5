"""``MemoryReplayPlugin``: replay a byte-bounded memory buffer inside any Avalanche ``SupervisedTemplate``.

One line turns a strategy the user already runs into rehearsal from a memory of fixed bytes::

    strategy = EWC(model, optimizer, criterion, ewc_lambda=0.4,
                   plugins=[MemoryReplayPlugin(PixelBuffer(313_800, SPECS["mnist"]))])

Two protocols:

* replay (default): each minibatch holds ``batch_size`` samples of the experience and
  ``batch_size_mem`` samples of the buffer, drawn by Avalanche's ``ReplayDataLoader``;
  the buffer is updated after the experience, so the end-of-experience evaluation
  already sees it. The mix moves accuracy by tens of points (benchmarks/continual.py).
* fresh (``fresh_epochs > 0``): after each experience the model is reset to its initial
  weights and trained on the buffer alone with the DSA/DM protocol (the continual
  experiment of Zhao & Bilen, WACV 2023, and GDumb's idea of learning from the memory
  only).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from avalanche.training.plugins import ReplayPlugin

from fedcl_dd.augment import DSA
from fedcl_dd.evaluate import train_model
from fedcl_dd.precision import PRECISIONS

from .buffers import MemoryBuffer

__all__ = ["DEFAULT_BATCH_SIZE_MEM", "MemoryReplayPlugin"]

# Memory samples per minibatch (beside the strategy's train_mb_size new ones). The value came from
# an early sweep scored on SplitMNIST's test split (continual_split_mnist_mix.json, in git
# history); benchmarks/continual.py --select chooses it per row on a validation split instead.
DEFAULT_BATCH_SIZE_MEM = 128


class MemoryReplayPlugin(ReplayPlugin):
    """Replay a :class:`~fedcl_dd.strategies.avalanche.buffers.MemoryBuffer` (pixels or addressing memory).

    Avalanche's ``ReplayPlugin`` with the buffer as its storage policy: its minibatch mixing
    is used as it is; what this class adds is the fresh-model protocol. (Avalanche's
    ``FromScratchTrainingPlugin`` resets the model before each experience; the fresh protocol
    resets it after the experience, to train on the memory alone, so it keeps its own copy.)

    :param buffer: the memory buffer, updated after every training experience.
    :param batch_size: new samples per minibatch (default: the strategy's ``train_mb_size``).
    :param batch_size_mem: memory samples per minibatch (default :data:`DEFAULT_BATCH_SIZE_MEM`).
    :param task_balanced_dataloader: balance memory samples over task labels (Avalanche's option).
    :param fresh_epochs: if > 0, the fresh-model protocol: after each experience, reset the model
        and train it on the buffer only for this many epochs (SGD lr ``fresh_lr``, momentum 0.9,
        weight decay 5e-4, lr / 10 at half, the strategy's ``train_mb_size``, DSA if ``fresh_augment``).
    :param seed: seeds the fresh-model training's data order and augmentation.
    :param precision: ``"fp32"`` or ``"bf16"``: the fresh-model training under bfloat16
        autocast where the device computes it natively (the memory's distillation takes its
        own ``precision``).
    :param build_over_train: cap each memory update's wall-clock time at this multiple of the
        time the experience took to train (from ``before_training_exp`` to
        ``after_training_exp``): the memory's matching stops at the first iteration past it,
        so building the memory never costs much more than that (None, the default: no cap;
        the memory runs its iterations however long they take).
    """

    def __init__(
        self,
        buffer: MemoryBuffer,
        batch_size: int | None = None,
        batch_size_mem: int = DEFAULT_BATCH_SIZE_MEM,
        task_balanced_dataloader: bool = False,
        fresh_epochs: int = 0,
        fresh_lr: float = 0.01,
        fresh_augment: bool = False,
        seed: int = 0,
        precision: str = "fp32",
        build_over_train: float | None = None,
    ) -> None:
        if not isinstance(buffer, MemoryBuffer):
            raise TypeError(f"buffer must be a MemoryBuffer, got {type(buffer).__name__}")
        for name, value in (("batch_size", batch_size), ("batch_size_mem", batch_size_mem)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if fresh_epochs < 0:
            raise ValueError(f"fresh_epochs must be >= 0, got {fresh_epochs}")
        if build_over_train is not None and not build_over_train > 0:
            raise ValueError(
                f"build_over_train must be > 0 (a multiple of the experience's training time), "
                f"or None for no cap; got {build_over_train}"
            )
        super().__init__(
            mem_size=buffer.max_size,
            batch_size=batch_size,
            batch_size_mem=batch_size_mem,
            task_balanced_dataloader=task_balanced_dataloader,
            storage_policy=buffer,
        )
        self.buffer = buffer
        self.fresh_epochs = fresh_epochs
        self.fresh_lr = fresh_lr
        self.fresh_augment = fresh_augment
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.build_over_train = build_over_train
        self._train_started: float | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.initial_state: dict[str, torch.Tensor] | None = None

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.fresh_epochs and self.initial_state is None:
            self.initial_state = copy.deepcopy(strategy.model.state_dict())

    def before_training_exp(
        self,
        strategy: Any,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        """Check the experience (the buffer refuses what it could not take, before any weight
        changes), then mix memory samples into every minibatch (replay protocol)."""
        self.buffer.check_experience(strategy.experience)
        self._train_started = time.perf_counter()
        if not self.fresh_epochs:
            super().before_training_exp(
                strategy, num_workers=num_workers, shuffle=shuffle, drop_last=drop_last, **kwargs
            )

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Distill the experience into the buffer; in the fresh protocol, retrain the model on it."""
        cap = None
        if self.build_over_train is not None and self._train_started is not None:
            cap = self.build_over_train * (time.perf_counter() - self._train_started)
        # post_adapt directly: ReplayPlugin's storage_policy.update() is deprecated in Avalanche 0.6.
        self.buffer.post_adapt(strategy, strategy.experience, seconds=cap)
        if self.fresh_epochs:
            self._train_fresh(strategy)

    def _train_fresh(self, strategy: Any) -> None:
        assert self.initial_state is not None and self.buffer.syn is not None
        model = strategy.model
        model.load_state_dict(self.initial_state)
        syn, spec = self.buffer.syn, self.buffer.spec
        with torch.no_grad():
            images, targets = syn.images().detach(), syn.targets().detach()
        augment = DSA(spec.dsa_strategy, generator=self.generator) if self.fresh_augment else None
        train_model(
            model,
            images,
            targets,
            self.fresh_epochs,
            lr=self.fresh_lr,
            batch_size=strategy.train_mb_size,
            augment=augment,
            generator=self.generator,
            precision=self.precision,
        )
