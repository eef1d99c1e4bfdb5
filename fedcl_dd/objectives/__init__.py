"""Matching objectives, one module each, behind one interface (:class:`Objective`)."""

from __future__ import annotations

from typing import Any

from .base import MatchingContext, Objective, class_means
from .dm import DistributionMatching
from .dm_dp import PrivateDistributionMatching
from .gm import GradientMatching
from .tm import TrajectoryMatching

__all__ = ["MatchingContext", "Objective", "class_means", "DistributionMatching",
           "PrivateDistributionMatching", "GradientMatching", "TrajectoryMatching", "OBJECTIVES", "make_objective"]

OBJECTIVES: dict[str, type[Objective]] = {
    DistributionMatching.name: DistributionMatching,
    PrivateDistributionMatching.name: PrivateDistributionMatching,
    GradientMatching.name: GradientMatching,
    TrajectoryMatching.name: TrajectoryMatching,
}


def make_objective(name: str, **kwargs: Any) -> Objective:
    """Build an objective by its method name (``dm``, ``dm-dp``, ``gm``, ``tm``)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
