"""The registry of objectives and parameterizations, and everything derived from their declarations.

Register a new method once, from anywhere (a plugin, a notebook, a test)::

    from fedcl_dd import Objective, Option, register_objective

    @register_objective
    class MyMatching(Objective):
        name = "mine"
        options = (Option("temperature", float, 1.0, "softmax temperature", low=0, open_low=True),)
        ...

and ``fedcl-dd distill --method mine --temperature 0.5``, ``FedConfig(method="mine")``
(run-config key ``temperature``) and the continual buffers accept it with no other edit:
the flags, keys and checks below are computed from the registered declarations.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, TypeVar

from .objectives import (
    CharacteristicFunctionMatching,
    DistributionMatching,
    GradientMatching,
    ImprovedDistributionMatching,
    Objective,
    PrivateDistributionMatching,
    TrajectoryMatching,
)
from .options import Option, OptionError
from .parameterizations import Addressing, MultiFormation, Parameterization, Pixels

__all__ = [
    "OBJECTIVES",
    "PARAMETERIZATIONS",
    "add_option_flags",
    "declared_options",
    "get_objective",
    "get_parameterization",
    "options_from_args",
    "register_objective",
    "register_parameterization",
    "split_options",
]

OBJECTIVES: dict[str, type[Objective]] = {}
PARAMETERIZATIONS: dict[str, type[Parameterization]] = {}

_T = TypeVar("_T", bound=type)


def _register(table: dict[str, Any], kind: str, cls: _T) -> _T:
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(
            f"{cls.__name__} needs a class attribute 'name' to be registered as a {kind}"
        )
    if name in table and table[name] is not cls:
        raise ValueError(
            f"a {kind} named {name!r} is registered already ({table[name].__qualname__})"
        )
    owners = declared_options()
    for opt in getattr(cls, "options", ()):
        known = owners.get(opt.name)
        if known is not None and known[0] != opt:
            raise ValueError(
                f"{cls.__name__} declares option {opt.name!r} unlike {', '.join(known[1])} do "
                f"({opt} vs {known[0]}): one name, one meaning; rename the option or reuse the declaration"
            )
    table[name] = cls
    return cls


def register_objective(cls: _T) -> _T:
    """Add an :class:`~fedcl_dd.objectives.Objective` subclass under its ``name`` (usable as a decorator)."""
    return _register(OBJECTIVES, "method", cls)


def register_parameterization(cls: _T) -> _T:
    """Add a :class:`~fedcl_dd.parameterizations.Parameterization` under its ``name`` (usable as a decorator)."""
    return _register(PARAMETERIZATIONS, "parameterization", cls)


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name``; ``ValueError`` lists the known ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def get_parameterization(name: str) -> type[Parameterization]:
    """The parameterization registered as ``name``; ``ValueError`` lists the known ones."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {name!r}; choose one of {sorted(PARAMETERIZATIONS)}"
        )
    return PARAMETERIZATIONS[name]


def declared_options() -> dict[str, tuple[Option, list[str]]]:
    """Every registered option by name, with the methods and parameterizations declaring it."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for table in (OBJECTIVES, PARAMETERIZATIONS):
        for name, cls in table.items():
            for opt in cls.options:
                out.setdefault(opt.name, (opt, []))[1].append(name)
    return out


def split_options(
    method: str, param: str, options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` (unset ones are ``None``) split into the objective's and the parameterization's,
    each parsed; a set option neither declares is an :class:`OptionError` naming who declares it."""
    obj, par = get_objective(method), get_parameterization(param)
    mine_obj = {o.name for o in obj.options}
    mine_par = {o.name for o in par.options}
    owners = declared_options()
    for key, value in options.items():
        if value is None or key in mine_obj or key in mine_par:
            continue
        who = owners.get(key, (None, []))[1]
        raise OptionError(
            f"option {key.replace('_', '-')} does not apply to method {method!r} with {param!r}"
            + (f"; it belongs to {', '.join(who)}" if who else "; no registered method declares it")
        )
    return (
        obj.check_options({k: v for k, v in options.items() if k in mine_obj}),
        par.check_options({k: v for k, v in options.items() if k in mine_par}),
    )


def add_option_flags(parser: argparse.ArgumentParser, title: str = "method options") -> None:
    """One flag per registered option (default: unset, i.e. the method's own default)."""
    group = parser.add_argument_group(
        title, "each applies to the methods/parameterizations named in its help"
    )
    for opt, owners in declared_options().values():
        opt.add_to(group, "/".join(owners))


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The registered options set on the command line (what :func:`add_option_flags` added)."""
    return {
        name: getattr(args, name)
        for name in declared_options()
        if getattr(args, name, None) is not None
    }


for _objective in (
    DistributionMatching,
    PrivateDistributionMatching,
    ImprovedDistributionMatching,
    CharacteristicFunctionMatching,
    GradientMatching,
    TrajectoryMatching,
):
    register_objective(_objective)
for _param in (Pixels, Addressing, MultiFormation):
    register_parameterization(_param)
