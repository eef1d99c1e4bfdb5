"""A distillation recipe: the few choices a user makes, turned into a synthetic set and an objective.

The command line, the Flower client and the Avalanche buffer all build their
synthetic sets through :class:`Recipe` (by way of :class:`~fedcl_dd.pipeline.Distillation`),
so a method means the same thing everywhere: the defaults its objective class declares,
the same budget rules, the same errors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import DatasetSpec
from .objectives import Objective, Plan
from .parameterizations import INITS, Parameterization
from .registry import get_objective, get_parameterization, split_options
from .sampling import ClassSampler
from .synthetic import SyntheticSet, bytes_per_image, soft_label_bytes

__all__ = ["STORAGE_DTYPES", "Recipe"]

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Recipe:
    """What to distill and how.

    ``ipc`` sets the budget as the bytes of ``ipc`` labelled images per class at the
    storage dtype, unless ``budget_bytes`` is given. A pixel set holds as many images
    as fit; an addressing memory spends the same bytes on bases and addresses.
    ``teacher_epochs`` > 0 trains a network on the real data for that many epochs before
    distilling (on the run's clock) and stores its predictions on the distilled images as
    their soft labels (within
    the budget, which then buys fewer images: :meth:`image_budget`; :mod:`fedcl_dd.teacher`).
    ``lr_images``, ``momentum`` and ``init`` default to what the method's objective class
    declares; ``options`` are the objective's and the parameterization's own
    (e.g. ``{"real_per_class": 64, "bases": 8}``), checked against their declarations.
    """

    method: str = "dm"
    param: str = "pixels"
    ipc: int = 10
    budget_bytes: int | None = None
    storage: str = "fp32"
    iterations: int = 1000
    lr_images: float | None = None
    momentum: float | None = None
    init: str | None = None
    soft_labels: bool = False
    teacher_epochs: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = get_objective(self.method)
        param_cls = get_parameterization(self.param)
        if cls.projects and not param_cls.bounded:
            warnings.warn(
                f"{self.method} keeps its images within the data's pixel range after every "
                f"step, but {self.param!r} stores no pixels to clamp (its images are computed "
                "from what it stores), so its images may drift out of range under the noise "
                "and a server may refuse them: use param 'pixels' or 'multi' for this method",
                stacklevel=3,
            )
        if self.storage not in STORAGE_DTYPES:
            raise ValueError(
                f"unknown storage {self.storage!r}; choose one of {sorted(STORAGE_DTYPES)}"
            )
        if self.ipc < 1:
            raise ValueError(f"images per class must be >= 1, got {self.ipc}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if self.init is None:
            self.init = cls.default_init
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if cls.private and self.init == "real":
            raise ValueError(
                f"{self.method} with init 'real' would publish real images (and, for addressing memories, "
                f"principal directions of the real data): start private sets from noise (--init noise)"
            )
        if self.teacher_epochs < 0:
            raise ValueError(
                f"teacher_epochs must be >= 0 (0: hard labels), got {self.teacher_epochs}"
            )
        if cls.private and self.teacher_epochs:
            raise ValueError(
                f"{self.method} with teacher labels would publish the predictions of a network "
                "trained on the private records, which leak them: use teacher_epochs=0"
            )
        if self.momentum is None:
            self.momentum = cls.momentum
        self.objective_options, self.param_options = split_options(
            self.method, self.param, self.options
        )

    @property
    def objective_class(self) -> type[Objective]:
        return get_objective(self.method)

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.storage]

    @property
    def lr(self) -> float:
        """The image learning rate: as given, else the method's published default for ``ipc``."""
        return (
            self.lr_images
            if self.lr_images is not None
            else self.objective_class.default_lr(self.ipc)
        )

    def parameterization(self, spec: DatasetSpec) -> Parameterization:
        """The parameterization for ``spec`` at the storage dtype, with its options."""
        return get_parameterization(self.param)(spec, self.dtype, **self.param_options)

    def budget_for(self, spec: DatasetSpec, num_classes: int) -> int:
        """The byte budget for a set of ``num_classes`` classes."""
        if self.budget_bytes is not None:
            return int(self.budget_bytes)
        return bytes_per_image(spec.image_shape, self.dtype) * self.ipc * num_classes

    @property
    def stores_soft_labels(self) -> bool:
        """Whether the set stores a probability per class and image (learned or a teacher's)."""
        return self.soft_labels or self.teacher_epochs > 0

    def image_budget(self, spec: DatasetSpec, num_classes: int) -> int:
        """The bytes of :meth:`budget_for` the images (with their hard labels) may take.

        All of them with hard labels. A set that stores soft labels keeps ``spec.num_classes``
        values per image at the storage dtype besides, so its images get the most bytes that
        leave room for those: the labelled set still fits the budget (it holds fewer images).
        ``ValueError`` if not even one image per class fits with its labels.
        """
        budget = self.budget_for(spec, num_classes)
        if not self.stores_soft_labels:
            return budget
        param = self.parameterization(spec)
        per_image = soft_label_bytes(spec.num_classes, self.dtype)

        def fits(images_bytes: int) -> bool:
            try:
                held = param.max_images(images_bytes, num_classes)
            except ValueError:  # not one image per class: nothing to label
                return True
            return images_bytes + held * per_image <= budget

        # A share that fits, found by bisection: the largest one for pixel and multi-formation
        # sets, whose images never shrink as their share grows; an addressing plan is not
        # monotone in bytes (it trades bases for addresses), so its share may be smaller.
        lo, hi = 0, budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        try:
            param.check_budget(lo, num_classes)
        except ValueError:
            raise ValueError(
                f"a budget of {budget} bytes holds no {self.param} set of {num_classes} classes "
                f"once soft labels take {per_image} bytes per image: raise the budget (ipc) or "
                "use hard labels (no soft_labels, teacher_epochs=0)"
            ) from None
        return lo

    def init_synthetic(
        self,
        real: ClassSampler,
        spec: DatasetSpec,
        generator: torch.Generator,
        classes: list[int] | None = None,
        info: dict[str, Any] | None = None,
    ) -> SyntheticSet:
        """A synthetic set for ``classes`` (default: every class ``real`` holds) within the budget."""
        classes = list(classes if classes is not None else real.classes)
        if not classes:
            raise ValueError("no classes to distill: the real data holds no samples")
        meta = {
            "method": self.method,
            "dataset": spec.name,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "class_names": list(spec.class_names),
            **(info or {}),
        }
        assert self.init is not None  # resolved in __post_init__
        budget = self.image_budget(spec, len(classes))
        syn = self.parameterization(spec).init(real, budget, classes, self.init, generator, meta)
        if self.soft_labels:
            syn.make_labels_learnable()
        return syn

    def objective(
        self, planned_iterations: int | None = None, cache_dir: str | Path | None = None
    ) -> Objective:
        """The matching objective with the recipe's options.

        ``planned_iterations`` (default ``iterations``) counts every S update of the whole
        run, e.g. rounds times iterations for a federated client; ``cache_dir`` keeps costly
        artifacts such as expert trajectories.
        """
        plan = Plan(
            self.ipc,
            self.iterations if planned_iterations is None else planned_iterations,
            None if cache_dir is None else Path(cache_dir),
        )
        return self.objective_class.build(self.objective_options, plan)
