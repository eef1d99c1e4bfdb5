"""Let Avalanche's own ``save_checkpoint`` pickle strategies that hold a torch optimizer.

Avalanche checkpoints pickle the whole strategy with dill. dill pickles a class by value
unless it finds it by walking attributes from its module's name, and ``torch.optim``
deletes its submodule names (``del sgd``, ``del optimizer``, ...), so dill does not find
``torch.optim.sgd.SGD`` and copies the class, its base ``Optimizer`` and their methods.
One of those methods is wrapped by ``typing_extensions.deprecated``; the wrapper's
``__module__`` (set by ``functools.wraps``) is the hidden ``torch.optim.optimizer`` too, so
dill copies its globals, the ``typing_extensions`` module namespace, which holds
``_marker = sentinel("sentinel")``: a sentinel pickles by its name, ``sentinel`` names the
class, not the marker, and pickling fails with ``PicklingError: Can't pickle sentinel: it's
not the same object as typing_extensions.sentinel`` -- for any strategy, plugin or not.

:func:`register` gives dill a reducer for torch's optimizers (Avalanche's documented
extension point, ``dill.register``) that names the class by module and qualified name, as
the standard pickle does, and restores the state through the optimizer's own
``__getstate__`` / ``__setstate__``. Importing this package's buffers module calls it.
"""

from __future__ import annotations

import importlib
from typing import Any

import dill
import torch

__all__ = ["register"]


def _optimizer_class(module: str, qualname: str) -> type[torch.optim.Optimizer]:
    # importlib finds the submodule in sys.modules, where the attribute walk dill uses cannot.
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise TypeError(f"{module}.{qualname} is not a torch optimizer class")
    return found


def _new_optimizer(module: str, qualname: str) -> torch.optim.Optimizer:
    """The unpickling half: an empty optimizer of the named class (its state follows)."""
    cls = _optimizer_class(module, qualname)
    return cls.__new__(cls)


def _save_optimizer(pickler: Any, obj: torch.optim.Optimizer) -> None:
    # What object.__reduce_ex__ does (new object, then __setstate__ with __getstate__'s
    # state), with the class named rather than copied.
    cls = type(obj)
    pickler.save_reduce(
        _new_optimizer, (cls.__module__, cls.__qualname__), obj.__getstate__(), obj=obj
    )


def _subclasses(cls: type[Any]) -> list[type[Any]]:
    out: list[type[Any]] = []
    direct: list[type[Any]] = cls.__subclasses__()
    for sub in direct:
        out += [sub, *_subclasses(sub)]
    return out


def register() -> None:
    """Register the reducer for ``torch.optim.Optimizer`` and every optimizer class torch defines.

    Idempotent. dill dispatches on the exact type, so each class is registered; classes
    from other packages are left to dill (their modules are usually found).
    """
    for cls in [torch.optim.Optimizer, *_subclasses(torch.optim.Optimizer)]:
        if cls.__module__.split(".")[0] == "torch":
            dill.register(cls)(_save_optimizer)
