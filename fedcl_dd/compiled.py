"""Opt-in ``torch.compile`` of matching networks' embeddings.

Distribution matching draws a new network every iteration, so compiling each network would
compile every iteration. Instead one process-wide compiled function takes the network as an
argument: dynamo treats its parameters as inputs, and every later network of the same class
and input shape reuses the compiled code (a new batch size compiles once more, then runs
with a dynamic batch dimension).

What it buys on CPU is fusion: TorchInductor turns each instance norm, ReLU and average
pooling (forward and backward) into one vectorized loop, where eager PyTorch runs a
memory-bound kernel per layer; its convolutions stay oneDNN's. With eager pooling vectorized
(:class:`~fedcl_dd.models.AvgPool2x2`) that is worth little here: a DM iteration on MNIST
(10 images per class, 64 real per class, one thread, AMD EPYC) takes 0.86 s compiled against
1.01 s eager, after 23 s of compilation, so it pays back after ~150 iterations (at 256 real
per class, 2.86 against 3.24 s, ~60 iterations). ``benchmarks/speed.py --compile`` measures
the payback for each method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "COMPILE_MODES",
    "check_mode",
    "compile_embedding",
    "compiled_forward",
    "has_compiled_embedding",
]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

_Call = Callable[[nn.Module, torch.Tensor], torch.Tensor]
_COMPILED: dict[str, _Call] = {}
_FORWARDS: dict[str, _Call] = {}


def check_mode(mode: str, eager: str) -> str:
    """``mode`` if torch.compile knows it; else a ValueError naming the modes and ``eager``,
    the caller's way to run uncompiled (e.g. ``"None"``)."""
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"compile must be one of {list(COMPILE_MODES)}, or {eager} to run eager; got {mode!r}"
        )
    return mode


def _embed_of_class(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # type(net).embed, not net.embed: compile_embedding replaces the instance's embed with a
    # call of this function, which would otherwise call itself.
    out: torch.Tensor = type(net).embed(net, x)  # type: ignore[attr-defined]
    return out


def compile_embedding(net: nn.Module, mode: str = "default") -> nn.Module:
    """Route ``net.embed`` (and so ``net(x)``, for models whose forward calls it) through the
    process-wide compiled embedding of ``mode``; returns ``net``, changed in place.

    Give it a network of its own (DM's are fresh or copied each iteration): a compiled
    ``embed`` is an instance attribute, which ``copy.deepcopy`` would carry along.
    """
    check_mode(mode, "an uncompiled network")
    if not callable(getattr(type(net), "embed", None)):
        raise TypeError(
            f"{type(net).__name__} has no embed(x) method to compile; give it one returning the "
            "penultimate features, as fedcl_dd.models' networks do"
        )
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_embed_of_class, mode=mode)
    setattr(net, "embed", functools.partial(_COMPILED[mode], net))  # noqa: B010 (nn.Module typing)
    return net


def has_compiled_embedding(net: nn.Module) -> bool:
    """Whether :func:`compile_embedding` routed ``net.embed`` through a compiled function."""
    return "embed" in vars(net)  # the instance attribute compile_embedding sets


def _forward_of_class(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = type(net).forward(net, x)
    return out


def compiled_forward(mode: str = "default") -> _Call:
    """The process-wide compiled ``net(x)`` of ``mode``, called as ``f(net, x)``.

    For networks that train (a model pool's): like :func:`compile_embedding`, one compiled
    function serves every network of a class, and nothing is attached to the network, so
    copies of it stay plain modules. Give it a network whose ``embed`` is not compiled already.
    """
    check_mode(mode, "a plain net(x)")
    if mode not in _FORWARDS:
        _FORWARDS[mode] = torch.compile(_forward_of_class, mode=mode)
    return _FORWARDS[mode]
