"""A seeded start for DM runs on digits, shared by the loop's and the precision tests."""

from __future__ import annotations

import torch

from fedcl_dd.augment import DSA
from fedcl_dd.data import Dataset
from fedcl_dd.objectives import MatchingContext
from fedcl_dd.sampling import ClassSampler
from fedcl_dd.synthetic import PixelSet


def dm_start(
    digits: Dataset, sampler: ClassSampler, seed: int = 0
) -> tuple[MatchingContext, PixelSet]:
    """DM's context on digits (DSA and networks seeded by ``seed``) and 2 real images per class."""
    ctx = MatchingContext(
        sampler,
        digits.spec,
        augment=DSA(digits.spec.dsa_strategy, torch.Generator().manual_seed(seed + 1)),
        generator=torch.Generator().manual_seed(seed),
    )
    syn = PixelSet.from_real(sampler, 2, generator=torch.Generator().manual_seed(seed))
    return ctx, syn
