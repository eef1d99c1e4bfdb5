"""Checkpoints of strategies that replay a condensed buffer, through Avalanche's own mechanism.

:func:`save` writes Avalanche's ``save_checkpoint`` (the whole strategy, plugins and
buffers included, pickled with dill) atomically; :func:`resume` wraps
``maybe_load_checkpoint`` and refuses a checkpoint whose memories were configured
differently (another budget, buffer kind, dataset, method...) or whose condensed memories
fail their check (the digest taken when they were stored, and the core's validator),
leaving the strategy as it was. After resuming, use the returned strategy's plugins, not objects built
before loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcl_dd.io import atomic_write

from .buffers import CondensedBuffer

__all__ = ["memories", "resume", "save"]


def memories(strategy: Any) -> list[Any]:
    """The storage policies of the strategy's replay plugins (ours and Avalanche's), in plugin order."""
    return [
        p.storage_policy for p in getattr(strategy, "plugins", []) if hasattr(p, "storage_policy")
    ]


def _signature(strategy: Any) -> list[dict[str, Any]]:
    out = []
    for memory in memories(strategy):
        if isinstance(memory, CondensedBuffer):
            out.append(memory.config())
        else:
            out.append({"kind": type(memory).__name__, "max_size": memory.max_size})
    return out


def save(strategy: Any, path: str | Path) -> Path:
    """Avalanche's ``save_checkpoint(strategy, path)``, written atomically (between experiences only).

    dill pickles by reference while saving: by value, it fails on objects that current torch
    optimizers hold (typing sentinels), and a checkpoint should name classes, not copy them.
    """
    import dill
    from avalanche.checkpointing import save_checkpoint

    byref = dill.settings["byref"]
    dill.settings["byref"] = True
    try:
        return atomic_write(path, lambda f: save_checkpoint(strategy, f))
    finally:
        dill.settings["byref"] = byref


def resume(strategy: Any, path: str | Path, map_location: Any = None) -> tuple[Any, int]:
    """Avalanche's ``maybe_load_checkpoint``: the strategy as saved and the next experience to train.

    A missing file returns ``(strategy, 0)``. Raises ``ValueError`` naming the differences
    when the checkpoint's memories are configured unlike ``strategy``'s; the strategy is
    then left untouched.
    """
    from avalanche.checkpointing import maybe_load_checkpoint

    path = Path(path)
    expected = _signature(strategy)
    before = dict(strategy.__dict__)
    strategy, start = maybe_load_checkpoint(strategy, str(path), map_location=map_location)
    found = _signature(strategy)
    for i, memory in enumerate(memories(strategy)):
        if isinstance(memory, CondensedBuffer):
            try:
                memory.memory.verify()
            except ValueError as exc:
                strategy.__dict__.clear()
                strategy.__dict__.update(before)
                raise ValueError(
                    f"{path}: memory {i} ({type(memory).__name__}) fails its check: {exc}; "
                    "the checkpoint is corrupted, use another or start without resuming"
                ) from None
    if found != expected:
        strategy.__dict__.clear()
        strategy.__dict__.update(before)
        diffs = [
            f"{k}: checkpoint {f.get(k)!r}, this run {e.get(k)!r}"
            for e, f in zip(expected, found, strict=False)
            for k in sorted(set(e) | set(f))
            if e.get(k) != f.get(k)
        ] or [f"{len(found)} memories in the checkpoint, {len(expected)} in this run"]
        raise ValueError(
            f"{path} was written by another configuration ({'; '.join(diffs)}); resume with the same "
            f"settings or choose a new checkpoint file"
        )
    return strategy, start
