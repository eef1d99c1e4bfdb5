"""Class-indexed access to real data, the way matching objectives draw it."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ClassSampler"]


class ClassSampler:
    """Real images grouped by class, with reproducible draws from a ``torch.Generator``.

    ``x`` is (N, C, H, W) float, ``y`` (N,) int64 labels in ``[0, num_classes)``. The
    tensors are moved once to ``device``; draws return views on that device.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        device: torch.device | str | None = None,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}); got {int(y.min())}..{int(y.max())}"
            )
        device = torch.device(device) if device is not None else x.device
        self.x = x.to(device)
        self.y = y.to(device)
        self.num_classes = num_classes
        self.device = device
        order = torch.argsort(y.cpu(), stable=True)
        counts = torch.bincount(y.cpu(), minlength=num_classes)
        self._index = list(torch.split(order, counts.tolist()))
        self.counts = counts

    @property
    def classes(self) -> list[int]:
        """Classes that have at least one real sample, ascending."""
        return [c for c in range(self.num_classes) if self.counts[c] > 0]

    def _pick(
        self, c: int, n: int, generator: torch.Generator | None, cap: bool = False
    ) -> torch.Tensor:
        idx = self._index[c]
        if idx.numel() == 0:
            raise ValueError(f"class {c} has no real samples")
        if n <= idx.numel() or cap:
            return idx[torch.randperm(idx.numel(), generator=generator)[:n]]
        # Fewer samples than asked for: draw with replacement.
        return idx[torch.randint(idx.numel(), (n,), generator=generator)]

    def sample(self, c: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images of class ``c`` (without replacement when the class has enough)."""
        return self.x[self._pick(c, n, generator).to(self.device)]

    def sample_classes(
        self, classes: list[int], n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` images of each class in ``classes``, concatenated class by class, with
        labels: a class with fewer gives all of its images (their exact mean, at less cost than
        ``n`` draws with replacement)."""
        idx = torch.cat([self._pick(c, n, generator, cap=True) for c in classes]).to(self.device)
        return self.x[idx], self.y[idx]

    def poisson(
        self,
        classes: list[int],
        rate: float,
        generator: torch.Generator | None = None,
        uniform: Callable[[int], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Poisson subsample: every record of ``classes`` is kept independently with prob. ``rate``.

        This is the sampling that privacy amplification by subsampling (and Opacus's RDP
        accountant) assumes; the batch size is random. The coin flips are ``uniform(n)``
        if given (e.g. :meth:`fedcl_dd.privacy.PrivateRandom.uniform`), else drawn from
        ``generator``.
        """
        idx = torch.cat([self._index[c] for c in classes])
        coins = (
            uniform(idx.numel())
            if uniform is not None
            else torch.rand(idx.numel(), generator=generator)
        )
        keep = coins < rate
        idx = idx[keep].to(self.device)
        return self.x[idx], self.y[idx]
