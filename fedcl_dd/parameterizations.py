"""Parameterizations: how a synthetic set spends its bytes, declared once per kind.

A parameterization turns a byte budget and a set of classes into an initial
:class:`~fedcl_dd.synthetic.SyntheticSet` (from real images or from noise), says whether
a budget fits, and how many images it then replays. Like objectives, each one lists its
options (:class:`~fedcl_dd.options.Option`) and is listed by :mod:`fedcl_dd.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .data import DatasetSpec
from .options import Option, parse_declared
from .sampling import ClassSampler
from .synthetic import (
    AddressingPlan,
    AddressingSet,
    MultiFormationSet,
    PixelSet,
    SyntheticSet,
    pixel_ipc_for_budget,
)

__all__ = ["INITS", "Addressing", "MultiFormation", "Parameterization", "Pixels"]

INITS = ("real", "noise")


class Parameterization:
    """One way to store a synthetic set within a byte budget.

    Built for a dataset ``spec`` and a storage ``dtype`` with the options it declares;
    subclasses implement :meth:`check_budget`, :meth:`max_images` and :meth:`init`.
    ``bounded``: its stored values are pixels, so clamping them bounds every image it
    materializes (what objectives that ``project`` rely on).
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    bounded: ClassVar[bool] = False

    def __init__(
        self, spec: DatasetSpec, dtype: torch.dtype = torch.float32, **options: Any
    ) -> None:
        self.spec, self.dtype = spec, dtype
        self.settings = {
            **{o.name: o.default for o in self.options},
            **parse_declared(f"parameterization {self.name!r}", self.options, options),
        }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` parsed against the declarations; an undeclared one is an :class:`OptionError`."""
        return parse_declared(f"parameterization {cls.name!r}", cls.options, dict(options))

    def check_budget(self, budget_bytes: int, num_classes: int) -> None:
        """Raise ``ValueError`` (naming the bytes needed) if one image per class does not fit."""
        raise NotImplementedError

    def max_images(self, budget_bytes: int, num_classes: int) -> int:
        """Images a set of ``num_classes`` classes replays within ``budget_bytes``."""
        raise NotImplementedError

    def init(
        self,
        real: ClassSampler,
        budget_bytes: int,
        classes: list[int],
        init: str,
        generator: torch.Generator,
        info: dict[str, Any] | None = None,
    ) -> SyntheticSet:
        """A set for ``classes`` within ``budget_bytes``, from real images (``init="real"``) or
        noise (``"noise"``, which reads nothing of ``real`` but its device and label space)."""
        raise NotImplementedError


class Pixels(Parameterization):
    """Plain images: the budget buys as many labelled images per class as fit."""

    bounded = True

    name = "pixels"

    def ipc(self, budget_bytes: int, num_classes: int) -> int:
        return pixel_ipc_for_budget(budget_bytes, num_classes, self.spec.image_shape, self.dtype)

    def check_budget(self, budget_bytes: int, num_classes: int) -> None:
        self.ipc(budget_bytes, num_classes)

    def max_images(self, budget_bytes: int, num_classes: int) -> int:
        return self.ipc(budget_bytes, num_classes) * num_classes

    def init(
        self,
        real: ClassSampler,
        budget_bytes: int,
        classes: list[int],
        init: str,
        generator: torch.Generator,
        info: dict[str, Any] | None = None,
    ) -> PixelSet:
        ipc = self.ipc(budget_bytes, len(classes))
        if init == "real":
            return PixelSet.from_real(
                real, ipc, classes, generator, storage_dtype=self.dtype, info=info
            )
        return PixelSet.from_noise(
            real.num_classes,
            self.spec.image_shape,
            ipc,
            classes,
            generator,
            real.device,
            storage_dtype=self.dtype,
            info=info,
        )


class Addressing(Parameterization):
    """Addressing-matrix memory (Deng & Russakovsky, NeurIPS 2022): shared bases, per-class addresses."""

    name = "addressing"
    options = (
        Option(
            "downsample",
            int,
            None,
            "bases at 1/N resolution (default 2; 1 for images under 16 pixels)",
            low=1,
        ),
        Option("bases", int, None, "number of shared bases (default: from the budget)", low=1),
    )

    def plan(self, budget_bytes: int, num_classes: int) -> AddressingPlan:
        """How ``budget_bytes`` are spent on bases and addresses for ``num_classes`` classes."""
        ds = self.settings["downsample"] or (2 if self.spec.image_size >= 16 else 1)
        return AddressingPlan.for_budget(
            budget_bytes, num_classes, self.spec.image_shape, self.dtype, ds, self.settings["bases"]
        )

    def check_budget(self, budget_bytes: int, num_classes: int) -> None:
        self.plan(budget_bytes, num_classes)

    def max_images(self, budget_bytes: int, num_classes: int) -> int:
        return self.plan(budget_bytes, num_classes).per_class * num_classes

    def init(
        self,
        real: ClassSampler,
        budget_bytes: int,
        classes: list[int],
        init: str,
        generator: torch.Generator,
        info: dict[str, Any] | None = None,
    ) -> AddressingSet:
        plan = self.plan(budget_bytes, len(classes))
        if init == "real":
            return AddressingSet.from_real(real, plan, classes, generator, info=info)
        return AddressingSet.from_noise(
            plan, real.num_classes, classes, generator, real.device, info=info
        )


class MultiFormation(Pixels):
    """Multi-formation pixels (IDC, Kim et al., ICML 2022): the bytes of N labelled images
    store N mosaics of ``factor``^2 sub-images each, replayed at full size (see
    :class:`~fedcl_dd.synthetic.MultiFormationSet`)."""

    name = "multi"
    options = (
        Option(
            "factor", int, 2, "sub-images per side of a stored image (IDC's multi-formation)", low=1
        ),
    )

    @property
    def factor(self) -> int:
        """Sub-images per side; it must divide the dataset's image size."""
        factor = int(self.settings["factor"])
        _, h, w = self.spec.image_shape
        if h % factor or w % factor:
            raise ValueError(f"factor {factor} must divide {self.spec.name}'s image size {h}x{w}")
        return factor

    def max_images(self, budget_bytes: int, num_classes: int) -> int:
        return super().max_images(budget_bytes, num_classes) * self.factor**2

    def init(
        self,
        real: ClassSampler,
        budget_bytes: int,
        classes: list[int],
        init: str,
        generator: torch.Generator,
        info: dict[str, Any] | None = None,
    ) -> MultiFormationSet:
        stored, factor = self.ipc(budget_bytes, len(classes)), self.factor
        if init == "real":
            return MultiFormationSet.tiled_from_real(
                real, stored, factor, classes, generator, storage_dtype=self.dtype, info=info
            )
        noise = PixelSet.from_noise(
            real.num_classes, self.spec.image_shape, stored, classes, generator, real.device
        )
        return MultiFormationSet(
            noise.pixels.detach(), noise.labels, real.num_classes, factor, self.dtype, info
        )
