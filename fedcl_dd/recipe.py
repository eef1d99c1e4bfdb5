"""A distillation recipe: the few choices a user makes, turned into a synthetic set and an objective.

The command line, the Flower client and the Avalanche buffer all build their
synthetic sets through :class:`Recipe`, so a method means the same thing
everywhere: same defaults, same budget rules, same errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .data import DatasetSpec
from .objectives import OBJECTIVES, Objective, make_objective
from .objectives.tm import mtt_settings
from .sampling import ClassSampler
from .synthetic import AddressingPlan, AddressingSet, PixelSet, SyntheticSet, bytes_per_image, pixel_ipc_for_budget

__all__ = ["Recipe", "PARAMS", "STORAGE_DTYPES"]

PARAMS = ("pixels", "addressing")
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# Image learning rates of the original papers: DM 1 (10 from 100 images per class up),
# DC/DSA 0.1, MTT 100 at 10 images per class (1000 at 50). Private DM starts from noise and
# matches clipped embeddings, whose gradients are far smaller: 100 worked on digits.
_DEFAULT_LR = {"dm": 1.0, "dm-dp": 100.0, "gm": 0.1, "tm": 100.0}


@dataclass
class Recipe:
    """What to distill and how.

    ``ipc`` sets the budget as the bytes of ``ipc`` labelled images per class at the
    storage dtype, unless ``budget_bytes`` is given. A pixel set holds as many images
    as fit; an addressing memory spends the same bytes on bases and addresses.
    """

    method: str = "dm"
    param: str = "pixels"
    ipc: int = 10
    budget_bytes: int | None = None
    storage: str = "fp32"
    iterations: int = 1000
    lr_images: float | None = None
    momentum: float = 0.5
    init: str | None = None  # "real" or "noise"; default: noise for dm-dp (real data is private), else real
    soft_labels: bool = False
    downsample: int | None = None  # addressing bases at 1/downsample resolution; default 2 (1 below 16 px)
    bases: int | None = None
    objective_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in OBJECTIVES:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(OBJECTIVES)}")
        if self.param not in PARAMS:
            raise ValueError(f"unknown parameterization {self.param!r}; choose one of {list(PARAMS)}")
        if self.storage not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage {self.storage!r}; choose one of {sorted(STORAGE_DTYPES)}")
        if self.ipc < 1:
            raise ValueError(f"images per class must be >= 1, got {self.ipc}")
        if self.init is None:
            self.init = "noise" if self.method == "dm-dp" else "real"
        if self.init not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {self.init!r}")
        if self.method == "dm-dp" and self.init == "real":
            raise ValueError(
                "dm-dp with init 'real' would publish real images (and, for addressing memories, "
                "principal directions of the real data): start private sets from noise (--init noise)"
            )
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.storage]

    @property
    def lr(self) -> float:
        """The image learning rate: as given, else the method's published default."""
        if self.lr_images is not None:
            return self.lr_images
        if self.method == "dm" and self.ipc >= 100:
            return 10.0
        if self.method == "tm" and self.ipc >= 50:
            return 1000.0
        return _DEFAULT_LR[self.method]

    def budget_for(self, spec: DatasetSpec, num_classes: int) -> int:
        """The byte budget for a set of ``num_classes`` classes."""
        if self.budget_bytes is not None:
            return int(self.budget_bytes)
        return bytes_per_image(spec.image_shape, self.dtype) * self.ipc * num_classes

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
        budget = self.budget_for(spec, len(classes))
        meta = {
            "method": self.method,
            "dataset": spec.name,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "class_names": list(spec.class_names),
            **(info or {}),
        }
        syn: SyntheticSet
        if self.param == "pixels":
            ipc = pixel_ipc_for_budget(budget, len(classes), spec.image_shape, self.dtype)
            if self.init == "real":
                syn = PixelSet.from_real(real, ipc, classes, generator, storage_dtype=self.dtype, info=meta)
            else:
                syn = PixelSet.from_noise(
                    spec.num_classes, spec.image_shape, ipc, classes, generator, real.device,
                    storage_dtype=self.dtype, info=meta,
                )
        else:
            ds = self.downsample or (2 if spec.image_size >= 16 else 1)
            plan = AddressingPlan.for_budget(budget, len(classes), spec.image_shape, self.dtype, ds, self.bases)
            if self.init == "real":
                syn = AddressingSet.from_real(real, plan, classes, generator, info=meta)
            else:
                syn = AddressingSet.from_noise(plan, spec.num_classes, classes, generator, real.device, info=meta)
        if self.soft_labels:
            syn.make_labels_learnable()
        return syn

    def objective(self, **overrides: Any) -> Objective:
        """The matching objective with ``objective_args`` (and ``overrides``) applied.

        Trajectory matching starts from MTT's published settings for this many images per class.
        """
        defaults = mtt_settings(self.ipc) if self.method == "tm" else {}
        return make_objective(self.method, **{**defaults, **self.objective_args, **overrides})
