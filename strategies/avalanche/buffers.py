"""Condensed rehearsal memories: each experience distilled by the core into a buffer of fixed bytes.

After an experience, its classes are distilled (distribution matching by default,
Zhao & Bilen, WACV 2023; gradient or trajectory matching by option) into a
synthetic set, and the buffer replays the union over all classes seen. The byte
budget is fixed for the whole stream:

* :class:`CondensedPixelBuffer` splits it among the classes seen so far: when new
  classes arrive, each old class keeps the subset of its images whose mean embedding
  stays closest to the class's (Avalanche's herding selection, in the embedding
  space of a freshly initialized network, the space distribution matching works in);
* :class:`AddressingBuffer` is the addressing-matrix memory of Deng & Russakovsky
  (NeurIPS 2022): shared bases plus per-class addresses. New classes add addresses;
  the bases are re-fitted to the old memory's images and the new real data (and, with
  ``iterations`` > 0, the whole memory is then distilled against both; the default is 0),
  so the bytes never grow. At the byte
  cost of N pixel images it replays many more than N distinct images.

Both are Avalanche ``ExemplarsBuffer`` storage policies: ``buffer`` is a
classification dataset of detached CPU tensors, ``post_adapt(strategy, experience)``
updates it, and ``max_size`` is the most samples the buffer can ever hold within its
budget, so they also work inside Avalanche's ``ReplayPlugin(mem_size=buf.max_size,
storage_policy=buf)``. Every update builds the new memory first and swaps it in at
the end: a refused experience leaves the buffer as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.training.storage_policy import ExemplarsBuffer, HerdingSelectionStrategy
from torch.utils.data import DataLoader

from fedcl_dd.data import DatasetSpec
from fedcl_dd.distill import ProgressBar
from fedcl_dd.models import embed
from fedcl_dd.objectives import MatchingContext
from fedcl_dd.parameterizations import Addressing
from fedcl_dd.pipeline import Distillation
from fedcl_dd.recipe import STORAGE_DTYPES, Recipe
from fedcl_dd.registry import get_objective, get_parameterization
from fedcl_dd.sampling import ClassSampler
from fedcl_dd.synthetic import (
    AddressingPlan,
    AddressingSet,
    PixelSet,
    SyntheticSet,
    bytes_per_image,
    pixel_ipc_for_budget,
)

__all__ = [
    "BUFFERS",
    "AddressingBuffer",
    "CondensedBuffer",
    "CondensedPixelBuffer",
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


class CondensedBuffer(ExemplarsBuffer):
    """A byte-budgeted memory filled by distilling each experience (see the module docstring).

    :param budget_bytes: bytes of everything the memory stores (labels included), fixed
        for the stream; ``bytes_per_image(spec.image_shape) * N`` is "the bytes of N images".
    :param spec: the stream's dataset spec (image shape, normalization, DSA strategy).
    :param num_classes: the model's output space (default ``spec.num_classes``); classes
        outside it are refused.
    :param method: a registered non-private objective (default ``dm``).
    :param iterations: distillation iterations per experience (default: the class's
        ``default_iterations``: 10 for pixels; 0 for the addressing memory, which the core
        then builds from principal directions and projections of the data alone, because an
        iteration over its thousands of images costs ~10 s on a CPU core and the pixel
        learning rate is far too large for bases and addresses: pass ``lr_images`` with it).
    :param real_per_class: real images per class and iteration (for the methods declaring it).
    :param model: the network distillation embeds with (``convnet`` as in DM).
    :param lr_images: the distillation learning rate (default: the method's published one).
    :param downsample, bases: the addressing memory's base resolution and count (default: the core's plan).
    :param seed: seeds every draw of the buffer: networks, real batches, augmentation.
    """

    param: ClassVar[str] = ""
    default_iterations: ClassVar[int] = 10

    def __init__(
        self,
        budget_bytes: int,
        spec: DatasetSpec,
        *,
        num_classes: int | None = None,
        method: str = "dm",
        iterations: int | None = None,
        real_per_class: int = 64,
        lr_images: float | None = None,
        storage: str = "fp32",
        model: str = "convnet",
        augment: bool = True,
        downsample: int | None = None,
        bases: int | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> None:
        num_classes = spec.num_classes if num_classes is None else int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if real_per_class < 1:
            raise ValueError(f"real_per_class must be >= 1, got {real_per_class}")
        iterations = self.default_iterations if iterations is None else int(iterations)
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        if get_objective(method).private:
            raise ValueError(
                f"method {method!r} is private; a rehearsal memory uses a non-private method"
            )
        # Each setting goes to the objective or parameterization that declares it (the others ignore it).
        given = {"real_per_class": real_per_class, "downsample": downsample, "bases": bases}
        declared = {
            o.name for o in get_objective(method).options + get_parameterization(self.param).options
        }
        # The recipe validates method, storage, init, options and budget; ipc is set per experience.
        self.recipe = Recipe(
            method=method,
            param=self.param,
            budget_bytes=int(budget_bytes),
            storage=storage,
            iterations=iterations,
            lr_images=lr_images,
            init="real",
            options={k: v for k, v in given.items() if k in declared},
        )
        self.budget_bytes = int(budget_bytes)
        self.spec = spec
        self.num_classes = num_classes
        self.model = model
        self.augment = augment
        self.device = torch.device(device)
        self.progress = progress
        self.generator = torch.Generator().manual_seed(seed)
        self.check_budget(num_classes)  # one sample for every class the model can emit, up front
        super().__init__(self._max_samples())
        self.syn: SyntheticSet | None = None
        self.distill_seconds: list[float] = []

    # -- what subclasses provide --------------------------------------------------------------
    def check_budget(self, n_classes: int) -> None:
        """Raise ``ValueError`` (naming the bytes needed) if ``n_classes`` classes do not fit."""
        raise NotImplementedError

    def _max_samples(self) -> int:
        raise NotImplementedError

    def _build(self, real: ClassSampler, new: list[int]) -> tuple[SyntheticSet, float]:
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.recipe.storage]

    @property
    def classes(self) -> list[int]:
        """Classes the memory holds, ascending."""
        return [] if self.syn is None else self.syn.classes

    @property
    def nbytes(self) -> int:
        """Bytes the memory stores now (its safetensors payload), never above ``budget_bytes``."""
        return 0 if self.syn is None else self.syn.nbytes

    def distinct_samples(self) -> int:
        """Distinct images the memory replays (identical images counted once)."""
        if self.syn is None:
            return 0
        with torch.no_grad():
            return int(torch.unique(self.syn.images().detach().flatten(1), dim=0).shape[0])

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint must agree on to be resumed with this buffer."""
        return {
            "kind": type(self).__name__,
            "budget_bytes": self.budget_bytes,
            "dataset": self.spec.name,
            "image_shape": list(self.spec.image_shape),
            "num_classes": self.num_classes,
            "method": self.recipe.method,
            "storage": self.recipe.storage,
        }

    def _distill(
        self, recipe: Recipe, real: ClassSampler, classes: list[int], label: str
    ) -> tuple[SyntheticSet, float]:
        """A new set for ``classes`` from ``real``, run through the core's pipeline (all draws from
        the buffer's generator); returns it with the seconds its iterations took."""
        run = Distillation(
            recipe,
            real,
            self.spec,
            generator=self.generator,
            augment=self.augment,
            device=self.device,
            classes=classes,
            model=self.model,
        )
        seconds = run.run([ProgressBar(f"distill {label}", disable=not self.progress)]).seconds
        return run.syn, seconds

    def _stored(self, syn: SyntheticSet) -> SyntheticSet:
        """``syn`` as it is stored (at the storage dtype), checked against the budget by the core's validator."""
        return SyntheticSet.from_state(
            syn.state_tensors(), syn.metadata(), max_bytes=self.budget_bytes
        )

    def _check_experience(self, y: torch.Tensor, expected: list[int] | None) -> list[int]:
        """The new classes of an experience; ``ValueError`` naming the problem if it cannot be added."""
        present = sorted(int(c) for c in torch.unique(y))
        outside = [c for c in present if not 0 <= c < self.num_classes]
        if outside:
            raise ValueError(
                f"classes {outside} are outside the model's output space [0, {self.num_classes}); "
                f"build the buffer with num_classes > {max(outside)} (and a model with as many outputs)"
            )
        if expected is not None:
            empty = sorted(set(expected) - set(present))
            if empty:
                raise ValueError(
                    f"the experience lists classes {sorted(expected)} but holds no samples of {empty}: "
                    f"the buffer cannot distill a class without data; drop those classes from the stream"
                )
        again = [c for c in present if c in self.classes]
        if again:
            raise ValueError(
                f"classes {again} are already in the buffer: the condensed buffer is for class-incremental "
                f"streams, where each class arrives in one experience"
            )
        self.check_budget(len(self.classes) + len(present))
        return present

    def add(self, x: torch.Tensor, y: torch.Tensor, expected: list[int] | None = None) -> None:
        """Distill the real data ``(x, y)`` of new classes into the memory, within the budget.

        ``expected`` lists the classes the experience announces (each must have samples).
        On any error the memory is unchanged.
        """
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"need as many labels as images, and at least one: got {x.shape[0]} and {y.shape[0]}"
            )
        if tuple(x.shape[1:]) != self.spec.image_shape:
            raise ValueError(
                f"images of shape {tuple(x.shape[1:])}, expected {self.spec.image_shape} ({self.spec.name})"
            )
        new = self._check_experience(y, expected)
        real = ClassSampler(x.detach().float(), y.detach().long(), self.num_classes, self.device)
        syn, seconds = self._build(real, new)
        syn = self._stored(syn)
        dataset = _dataset(syn)
        # Swap only now: everything above may raise and leaves the memory as it was.
        self.syn, self.buffer = syn, dataset
        self.distill_seconds.append(seconds)

    def post_adapt(self, agent_state: Any, exp: Any) -> None:
        """Avalanche's storage-policy hook: distill ``exp``'s data into the memory."""
        x, y = experience_tensors(exp.dataset)
        expected = getattr(exp, "classes_in_this_experience", None)
        self.add(x, y, None if expected is None else [int(c) for c in expected])


class CondensedPixelBuffer(CondensedBuffer):
    """Pixel memory: ``budget_bytes`` split evenly among the classes seen; old classes shrink by herding."""

    param = "pixels"

    def check_budget(self, n_classes: int) -> None:
        pixel_ipc_for_budget(self.budget_bytes, n_classes, self.spec.image_shape, self.dtype)

    def _max_samples(self) -> int:
        return self.budget_bytes // bytes_per_image(self.spec.image_shape, self.dtype)

    def _build(self, real: ClassSampler, new: list[int]) -> tuple[PixelSet, float]:
        ipc = pixel_ipc_for_budget(
            self.budget_bytes, len(self.classes) + len(new), self.spec.image_shape, self.dtype
        )
        recipe = dataclasses.replace(self.recipe, budget_bytes=None, ipc=ipc)
        fresh, seconds = self._distill(recipe, real, new, f"classes {new}")
        parts = [self._shrunk(ipc)] if self.syn is not None else []
        with torch.no_grad():
            parts.append((fresh.images().detach().cpu(), fresh.class_ids.cpu()))
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        return PixelSet(images, labels, self.num_classes, self.dtype, fresh.info), seconds

    def _shrunk(self, ipc: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The old memory with at most ``ipc`` images per class, chosen by herding (iCaRL's greedy
        mean-matching, Avalanche's implementation) in a fresh network's embedding."""
        assert self.syn is not None
        with torch.no_grad():
            images, ids = self.syn.images().detach().cpu(), self.syn.class_ids.cpu()
            ctx = MatchingContext(
                ClassSampler(images, ids, self.num_classes),
                self.spec,
                self.model,
                generator=self.generator,
                device=self.device,
            )
            net = ctx.fresh_network().eval()
            herding = HerdingSelectionStrategy(net, next(iter(net._modules)))
            keep = []
            for c in self.syn.classes:
                idx = torch.nonzero(ids == c).flatten()
                if idx.numel() > ipc:
                    emb = embed(net, images[idx].to(self.device)).cpu()
                    idx = idx[torch.tensor(herding.make_sorted_indices_from_features(emb)[:ipc])]
                keep.append(idx)
            keep_t = torch.cat(keep)
        return images[keep_t], ids[keep_t]

    def resize(self, strategy: Any, new_size: int) -> None:
        """Change the memory to ``new_size`` images' worth of bytes, shrinking it now if needed."""
        budget = int(new_size) * bytes_per_image(self.spec.image_shape, self.dtype)
        n = max(1, len(self.classes))
        pixel_ipc_for_budget(
            budget, n, self.spec.image_shape, self.dtype
        )  # refuses before any change
        old = self.budget_bytes
        self.budget_bytes = self.recipe.budget_bytes = budget
        try:
            if self.syn is not None and self.syn.nbytes > budget:
                images, labels = self._shrunk(
                    pixel_ipc_for_budget(budget, n, self.spec.image_shape, self.dtype)
                )
                syn = self._stored(
                    PixelSet(images, labels, self.num_classes, self.dtype, self.syn.info)
                )
                self.syn, self.buffer = syn, _dataset(syn)
        except BaseException:
            self.budget_bytes = self.recipe.budget_bytes = old
            raise
        self.max_size = int(new_size)


class AddressingBuffer(CondensedBuffer):
    """Addressing-matrix memory (Deng & Russakovsky, NeurIPS 2022): shared bases, per-class addresses.

    The number of bases is fixed by the budget (``AddressingPlan.for_budget``), so when
    classes arrive only the addresses per class shrink; the bases are re-fitted to the
    old memory's images together with the new real data (distilled against both only
    when ``iterations`` > 0; the default is 0).
    """

    param = "addressing"
    default_iterations = 0

    def _plan(self, n_classes: int) -> AddressingPlan:
        parameterization = self.recipe.parameterization(self.spec)
        assert isinstance(parameterization, Addressing)
        return parameterization.plan(self.budget_bytes, n_classes)

    def check_budget(self, n_classes: int) -> None:
        self._plan(n_classes)

    def _max_samples(self) -> int:
        return max(p.per_class * n for n in range(1, self.num_classes + 1) for p in [self._plan(n)])

    def _build(self, real: ClassSampler, new: list[int]) -> tuple[AddressingSet, float]:
        seen = sorted(self.classes + new)
        if self.syn is not None:
            # The old memory stands in for the real data of its classes.
            with torch.no_grad():
                old_x, old_y = self.syn.images().detach().cpu(), self.syn.class_ids.cpu()
            real = ClassSampler(
                torch.cat([old_x.to(self.device), real.x]),
                torch.cat([old_y.to(self.device), real.y]),
                self.num_classes,
                self.device,
            )
        syn, seconds = self._distill(self.recipe, real, seen, f"classes {seen}")
        return syn, seconds

    def resize(self, strategy: Any, new_size: int) -> None:
        """Keep at most ``new_size`` images: drop addresses (the bases stay), lowering the bytes."""
        n = max(1, len(self.classes))
        per_class = int(new_size) // n
        if per_class < 1:
            raise ValueError(
                f"new_size {new_size} is below one image for each of the {n} classes held"
            )
        if self.syn is not None and per_class < self.syn.per_class:
            s = self.syn
            syn = AddressingSet(
                s.bases.detach(),
                s.addresses.detach()[:per_class],
                s.held,
                s.num_classes,
                s.image_shape,
                s.downsample,
                s.storage_dtype,
                s.info,
            )
            self.budget_bytes = self.recipe.budget_bytes = syn.nbytes
            self.syn, self.buffer = syn, _dataset(syn)
        self.max_size = int(new_size)


def _dataset(syn: SyntheticSet) -> Any:
    """The memory as a task-aware classification dataset yielding ``(x, y, task 0)``, no transforms."""
    with torch.no_grad():
        images = syn.images().detach().cpu().contiguous()
    labels = syn.class_ids.cpu()
    return _make_taskaware_tensor_classification_dataset(
        images, labels, targets=labels.tolist(), task_labels=0
    )


BUFFERS: dict[str, type[CondensedBuffer]] = {
    "condensed-pixels": CondensedPixelBuffer,
    "condensed-addressing": AddressingBuffer,
}
