"""Matching objectives, one module each, behind one interface (:class:`Objective`).

They are listed by name in :mod:`fedcl_dd.registry`.
"""

from __future__ import annotations

from .base import REAL_PER_CLASS, MatchingContext, Objective, Plan, PrivateRelease, class_means
from .dm import DistributionMatching
from .dm_dp import PrivateDistributionMatching
from .gm import GradientMatching
from .idm import ImprovedDistributionMatching
from .ncfm import CharacteristicFunctionMatching
from .tm import TrajectoryMatching

__all__ = [
    "REAL_PER_CLASS",
    "CharacteristicFunctionMatching",
    "DistributionMatching",
    "GradientMatching",
    "ImprovedDistributionMatching",
    "MatchingContext",
    "Objective",
    "Plan",
    "PrivateDistributionMatching",
    "PrivateRelease",
    "TrajectoryMatching",
    "class_means",
]
