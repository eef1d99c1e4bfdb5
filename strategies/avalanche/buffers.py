"""Avalanche storage policies over the core's byte-bounded memories (:mod:`fedcl_dd.memory`).

After each experience, its classes are distilled into the memory (distribution matching
by default, Zhao & Bilen, WACV 2023; any registered non-private objective by option),
and the buffer replays the union over all classes seen, within a byte budget fixed for
the whole stream:

* :class:`PixelBuffer` over :class:`~fedcl_dd.memory.PixelMemory` (the budget
  split among the classes seen; old classes shrink by herding);
* :class:`MultiFormationBuffer` over :class:`~fedcl_dd.memory.MultiFormationMemory` (the
  same, each stored image a mosaic of ``factor``^2 sub-images);
* :class:`CompressedRealBuffer`, the multi-formation memory with no matching iteration: real
  images at 1/``factor`` resolution and the ``storage`` dtype, the baseline for any memory
  that stores more images than pixels;
* :class:`AddressingBuffer` over :class:`~fedcl_dd.memory.AddressingMemory` (shared
  bases and per-class addresses; by default the bases and addresses are the
  parameterization's initialization, with no matching iteration).

All are Avalanche ``ExemplarsBuffer`` storage policies: ``buffer`` is a classification
dataset whose images are built on demand from a frozen CPU copy of the stored set,
``post_adapt(strategy, experience)`` updates it, and
``max_size`` is the most samples the buffer can ever hold within its budget, so they also
work inside Avalanche's ``ReplayPlugin(mem_size=buf.max_size, storage_policy=buf)``. A
refused experience leaves the buffer as it was.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from avalanche.training.storage_policy import ExemplarsBuffer
from torch.utils.data import DataLoader, Dataset

from fedcl_dd.data import DatasetSpec
from fedcl_dd.memory import AddressingMemory, ByteBoundedMemory, MultiFormationMemory, PixelMemory
from fedcl_dd.recipe import Recipe
from fedcl_dd.synthetic import SyntheticSet

from .pickling import register as _register_pickling

# Every path that builds a memory buffer imports this module: from here on Avalanche's own
# save_checkpoint can pickle the strategy's torch optimizer (see .pickling for why it fails).
_register_pickling()

__all__ = [
    "BUFFERS",
    "AddressingBuffer",
    "CompressedRealBuffer",
    "MemoryBuffer",
    "MultiFormationBuffer",
    "PixelBuffer",
    "experience_tensors",
]


def experience_tensors(dataset: Any, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(x, y)`` of an Avalanche classification dataset as CPU tensors, through its eval transforms."""
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    collate = getattr(data, "collate_fn", None)
    xs, ys = [], []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate):
        xs.append(batch[0].detach().cpu().float())
        ys.append(torch.as_tensor(batch[1]).detach().cpu().long())
    if not xs:
        raise ValueError("the experience holds no samples: nothing to distill into the buffer")
    return torch.cat(xs), torch.cat(ys)


class MemoryBuffer(ExemplarsBuffer):
    """An Avalanche storage policy over a :class:`~fedcl_dd.memory.ByteBoundedMemory`.

    Takes the memory's arguments (``budget_bytes``, ``spec`` and its keyword options, see
    :class:`~fedcl_dd.memory.ByteBoundedMemory`) and keeps the memory as ``memory``.
    """

    memory_class: ClassVar[type[ByteBoundedMemory]]

    def __init__(self, budget_bytes: int, spec: DatasetSpec, **options: Any) -> None:
        self.memory = self.memory_class(budget_bytes, spec, **options)
        super().__init__(self.memory.max_samples())
        # The experience check_experience decoded (dataset id, images, labels), for post_adapt.
        self._checked: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (Avalanche's ``maybe_load_checkpoint``, a deep copy): re-validate the memory.

        ``ValueError`` if its tensors differ from their SHA-256 digest or fail the core's
        validator. Raised while the checkpoint is read, so ``maybe_load_checkpoint`` leaves the
        strategy untouched.
        """
        self.__dict__.update(state)
        try:
            self.memory.verify()
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None
        if self.memory.syn is not None:
            # The replayed dataset holds its own copy of the set, which the digest does not
            # cover: rebuild it from the memory just verified.
            self.buffer = _dataset(self.memory)

    # The memory's state, under the names the plugin, runner and checkpoints use.
    @property
    def syn(self) -> SyntheticSet | None:
        return self.memory.syn

    @property
    def spec(self) -> DatasetSpec:
        return self.memory.spec

    @property
    def recipe(self) -> Recipe:
        return self.memory.recipe

    @property
    def classes(self) -> list[int]:
        return self.memory.classes

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes

    @property
    def build_seconds(self) -> list[float]:
        return self.memory.build_seconds

    @property
    def iterations_run(self) -> list[int]:
        return self.memory.iterations_run

    def distinct_samples(self) -> int:
        return self.memory.distinct_samples()

    def config(self) -> dict[str, Any]:
        return {**self.memory.config(), "kind": type(self).__name__}

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        expected: list[int] | None = None,
        seconds: float | None = None,
    ) -> None:
        """Distill ``(x, y)`` into the memory (see :meth:`ByteBoundedMemory.add`, ``seconds``
        its cap on the update's time) and replay it."""
        self.memory.add(x, y, expected, seconds)
        self.buffer = _dataset(self.memory)

    def check_experience(self, exp: Any) -> None:
        """Refuse, with the reason, an experience the memory could not take -- before any
        training on it: non-finite images, classes outside the output space or already held,
        classes listed without samples, more classes than the budget holds, task labels
        other than 0 (the memory replays every sample at task 0, so a multi-task stream's
        replay would all go through head 0)."""
        tasks = sorted({int(t) for t in getattr(exp, "task_labels", [0])})
        if tasks != [0]:
            raise ValueError(
                f"experience {getattr(exp, 'current_experience', '?')} has task labels {tasks}; "
                "the memory buffers are for class-incremental streams (task label 0): build "
                "the benchmark without task labels (e.g. return_task_id=False)"
            )
        x, y = experience_tensors(exp.dataset)
        bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
        if bad:
            raise ValueError(
                f"experience {getattr(exp, 'current_experience', '?')} holds {bad} images with "
                "NaN or Inf values; clean or drop them before training"
            )
        expected = getattr(exp, "classes_in_this_experience", None)
        self.memory.check_update(y, None if expected is None else [int(c) for c in expected])
        self._checked = (id(exp.dataset), x, y)

    def post_adapt(self, agent_state: Any, exp: Any, seconds: float | None = None) -> None:
        """Avalanche's storage-policy hook: distill ``exp``'s data into the memory (within
        ``seconds``, when given)."""
        checked = self._checked
        if checked is not None and checked[0] == id(exp.dataset):
            x, y = checked[1], checked[2]  # decoded once, by check_experience
        else:
            x, y = experience_tensors(exp.dataset)
        self._checked = None
        expected = getattr(exp, "classes_in_this_experience", None)
        self.add(x, y, None if expected is None else [int(c) for c in expected], seconds)

    def update(self, strategy: Any, **kwargs: Any) -> None:
        """What Avalanche's deprecated ``update`` does, :meth:`post_adapt` on the strategy's
        experience, without its ``DeprecationWarning``: Avalanche's own ``ER_ACE`` still
        calls it on its storage policy every experience."""
        self.post_adapt(strategy, strategy.experience)

    def resize(self, strategy: Any, new_size: int) -> None:
        """Avalanche's resize: keep at most ``new_size`` images (see the memory's ``shrink``)."""
        self.memory.shrink(int(new_size))
        if self.memory.syn is not None:
            self.buffer = _dataset(self.memory)
        self.max_size = int(new_size)


class PixelBuffer(MemoryBuffer):
    """Pixel memory: ``budget_bytes`` split evenly among the classes seen; old classes shrink by herding."""

    memory_class = PixelMemory


class MultiFormationBuffer(MemoryBuffer):
    """Multi-formation pixel memory (IDC, Kim et al., ICML 2022): ``factor``^2 sub-images per
    stored image, the pixel memory's bytes."""

    memory_class = MultiFormationMemory


class CompressedRealBuffer(MultiFormationBuffer):
    """Compressed real images: the multi-formation memory with ``iterations`` fixed at 0.

    Each stored image is a mosaic of ``factor``^2 real images of one class, drawn at random
    without replacement and average-pooled to 1/``factor`` resolution (IDC's
    initialization), kept at the ``storage`` dtype (``fp16`` halves the bytes); old classes
    keep the mosaics herding picks. ``factor=1, storage="fp16"`` stores full-resolution real
    images at half precision. Bytes are counted as for every memory (what is stored).
    """

    def __init__(self, budget_bytes: int, spec: DatasetSpec, **options: Any) -> None:
        if options.get("iterations") not in (None, 0):
            raise ValueError(
                f"compressed real images run no matching iteration (got iterations="
                f"{options['iterations']}); to distill the same mosaics use MultiFormationBuffer "
                "(--buffer multi)"
            )
        super().__init__(budget_bytes, spec, **{**options, "iterations": 0})


class AddressingBuffer(MemoryBuffer):
    """Addressing-matrix memory (Deng & Russakovsky, NeurIPS 2022): shared bases, per-class addresses."""

    memory_class = AddressingMemory


class _OnDemand(Dataset):
    """A stored set's images, each built when asked for (``images_at``): replaying an
    addressing memory keeps its bases and addresses in RAM, not every decoded image."""

    def __init__(self, syn: SyntheticSet) -> None:
        self.syn = copy.deepcopy(syn).cpu().eval()  # frozen: later updates build a new one
        self.labels = syn.class_ids.cpu()

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            image = self.syn.images_at(torch.tensor([i]))[0]
        return image, int(self.labels[i])


def _dataset(memory: ByteBoundedMemory) -> Any:
    """The memory as a task-aware classification dataset yielding ``(x, y, task 0)``, no
    transforms, its images built on demand."""
    if memory.syn is None:
        raise RuntimeError("the memory is empty")
    labels = memory.syn.class_ids.cpu()
    # Avalanche 0.6 has no public builder of a classification dataset with the task labels
    # ReplayDataLoader needs; this one is exported by avalanche.benchmarks.utils.
    return _make_taskaware_classification_dataset(
        _OnDemand(memory.syn), targets=labels.tolist(), task_labels=0
    )


BUFFERS: dict[str, type[MemoryBuffer]] = {
    b.memory_class.param: b for b in (PixelBuffer, MultiFormationBuffer, AddressingBuffer)
}
