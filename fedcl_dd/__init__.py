"""fedcl-dd: dataset distillation for federated and continual learning.

The names most programs need, in one import::

    from fedcl_dd import ClassSampler, Distillation, ProgressBar, Recipe, evaluate, load_dataset
"""

from __future__ import annotations

from .data import SPECS, load_dataset
from .distill import Callback, Checkpointer, PeriodicEvaluation, ProgressBar, TimeLimit
from .evaluate import evaluate
from .objectives import Objective
from .options import Option
from .parameterizations import Parameterization
from .pipeline import Distillation
from .precision import Precision
from .recipe import Recipe
from .registry import register_objective, register_parameterization
from .sampling import ClassSampler
from .synthetic import SyntheticSet

__all__ = [
    "SPECS",
    "Callback",
    "Checkpointer",
    "ClassSampler",
    "Distillation",
    "Objective",
    "Option",
    "Parameterization",
    "PeriodicEvaluation",
    "Precision",
    "ProgressBar",
    "Recipe",
    "SyntheticSet",
    "TimeLimit",
    "evaluate",
    "load_dataset",
    "register_objective",
    "register_parameterization",
]
