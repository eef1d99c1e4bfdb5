"""Differentiable siamese augmentation (DSA; Zhao & Bilen, ICML 2021).

Every transform is differentiable with respect to the images, so gradients of a
matching loss flow back through the augmentation to synthetic pixels. For
*siamese* use one parameter set is sampled per step and applied unchanged to
the real and to the synthetic batch (every sample of both batches sees the same
transform), which keeps the matching signal about content, not about the draw.

Each call draws one family uniformly from the strategy string; ``color``
applies brightness, saturation and contrast in sequence. Randomness comes only
from the ``torch.Generator`` handed in: the global RNG is never read or reset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_STRATEGY", "DSA", "FAMILIES", "NO_FLIP_STRATEGY", "AugParams"]

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
NO_FLIP_STRATEGY = "color_crop_cutout_scale_rotate"  # digits: a mirrored 2 is not a 2


@dataclass(frozen=True)
class AugParams:
    """One sampled transform: its family and per-sample parameters.

    Tensors have a leading dimension of 1 (siamese: broadcast over any batch) or
    of the batch size (independent per sample).
    """

    family: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DSA:
    """Differentiable siamese augmentation with the DSA paper's ranges."""

    strategy: str = DEFAULT_STRATEGY
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    scale: float = 1.2
    rotate_degrees: float = 15.0

    def __post_init__(self) -> None:
        self.families = tuple(self.strategy.split("_")) if self.strategy else ()
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(
                f"unknown augmentation {unknown} in strategy {self.strategy!r}; "
                f"use '_'-joined names from {FAMILIES}"
            )

    # -- sampling -----------------------------------------------------------------------------
    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def sample(self, n: int = 1) -> AugParams:
        """Draw a family and its parameters for ``n`` samples (``n=1``: one siamese transform)."""
        if not self.families:
            return AugParams("none")
        idx = int(torch.randint(len(self.families), (1,), generator=self.generator))
        family = self.families[idx]
        r = self._rand
        if family == "color":
            values = {
                "brightness": (r(n) - 0.5) * self.brightness,
                "saturation": r(n) * self.saturation,
                "contrast": r(n) + self.contrast,
            }
        elif family == "crop":
            values = {"shift": (r(n, 2) * 2 - 1) * self.crop}
        elif family == "cutout":
            values = {"center": r(n, 2)}
        elif family == "flip":
            values = {"flip": r(n) < 0.5}
        elif family == "scale":
            values = {"scale": r(n, 2) * (self.scale - 1.0 / self.scale) + 1.0 / self.scale}
        else:  # rotate
            values = {"angle": (r(n) * 2 - 1) * math.radians(self.rotate_degrees)}
        return AugParams(family, values)

    # -- application --------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply a sampled transform to a batch ``x`` of shape (N, C, H, W)."""
        fam = params.family
        if fam == "none" or x.shape[0] == 0:  # Poisson draws of small clients can be empty
            return x
        v = {k: t.to(x.device) for k, t in params.values.items()}
        n = x.shape[0]
        if fam == "color":
            x = x + v["brightness"].view(-1, 1, 1, 1).to(x.dtype)
            mean_c = x.mean(dim=1, keepdim=True)
            x = (x - mean_c) * v["saturation"].view(-1, 1, 1, 1).to(x.dtype) + mean_c
            mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - mean_all) * v["contrast"].view(-1, 1, 1, 1).to(x.dtype) + mean_all
        if fam == "flip":
            return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        if fam == "cutout":
            return x * _cutout_mask(x, v["center"], self.cutout)
        theta = torch.zeros(v[next(iter(v))].shape[0], 2, 3, device=x.device, dtype=x.dtype)
        if fam == "crop":
            # Normalized grid coordinates span 2 units per side: a shift of f sides is 2f.
            theta[:, 0, 0] = 1.0
            theta[:, 1, 1] = 1.0
            theta[:, :, 2] = 2.0 * v["shift"].to(x.dtype)
        elif fam == "scale":
            theta[:, 0, 0] = v["scale"][:, 0].to(x.dtype)
            theta[:, 1, 1] = v["scale"][:, 1].to(x.dtype)
        else:  # rotate
            a = v["angle"].to(x.dtype)
            theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
            theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
        theta = theta.expand(n, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __call__(self, x: torch.Tensor, params: AugParams | None = None) -> torch.Tensor:
        """Augment ``x``: with ``params`` (siamese use) or with a fresh per-sample draw."""
        return self.apply(x, params if params is not None else self.sample(x.shape[0]))


def _cutout_mask(x: torch.Tensor, center: torch.Tensor, frac: float) -> torch.Tensor:
    """A 0/1 mask that zeroes a ``frac*H`` x ``frac*W`` patch around ``center`` (in [0, 1]^2)."""
    _, _, h, w = x.shape
    half_h, half_w = frac * h / 2, frac * w / 2
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    cy = (center[:, 0] * h).to(x.dtype).view(-1, 1, 1)
    cx = (center[:, 1] * w).to(x.dtype).view(-1, 1, 1)
    inside = ((ys - cy).abs() < half_h) & ((xs - cx).abs() < half_w)
    return (~inside).to(x.dtype).unsqueeze(1)
