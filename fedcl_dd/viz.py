"""Pictures of synthetic sets: a PNG grid, one row per class."""

from __future__ import annotations

from pathlib import Path

import torch

from .synthetic import SyntheticSet

__all__ = ["class_grid", "save_grid"]


def class_grid(
    syn: SyntheticSet, mean: tuple[float, ...], std: tuple[float, ...], per_class: int = 10
) -> torch.Tensor:
    """A (3 or 1, H, W) image in [0, 1]: up to ``per_class`` images of each held class, a row each."""
    # Imported here: torchvision costs every process that imports the CLI or the Flower apps
    # (each Ray actor, SuperNode and ClientApp) about a second, and few of them draw a grid.
    from torchvision.utils import make_grid

    with torch.no_grad():
        images = syn.images().detach().cpu().float()
    ids = syn.class_ids.cpu()
    classes = syn.classes
    cols = min(per_class, max(int((ids == c).sum()) for c in classes))
    tiles: list[torch.Tensor] = []
    blank = torch.zeros_like(images[0])
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    for c in classes:
        row = list((images[ids == c][:cols] * s + m).clamp(0, 1))
        tiles += row + [blank] * (cols - len(row))
    return make_grid(torch.stack(tiles), nrow=cols, padding=1, pad_value=1.0)


def save_grid(syn: SyntheticSet, path: str | Path, per_class: int = 10) -> Path:
    """Write :func:`class_grid` as a PNG, using the normalization recorded in ``syn.info``."""
    from torchvision.utils import save_image  # see class_grid

    channels = syn.image_shape[0]
    mean = tuple(syn.info.get("mean", [0.0] * channels))
    std = tuple(syn.info.get("std", [1.0] * channels))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = class_grid(syn, mean, std, per_class)
    # Tiny images (8x8 digits) are unreadable at one pixel per pixel: scale them up.
    scale = max(1, 64 // syn.image_shape[1])
    if scale > 1:
        grid = torch.nn.functional.interpolate(
            grid.unsqueeze(0), scale_factor=scale, mode="nearest"
        )[0]
    save_image(grid, str(path))
    return path
