"""Checkpoints of strategies that replay a memory buffer, through Avalanche's own mechanism.

Avalanche's ``save_checkpoint`` / ``maybe_load_checkpoint`` work on their own once this
package's buffers are imported (:mod:`.pickling` lets dill pickle torch's optimizers; each
memory buffer re-validates its memory when unpickled). :func:`save` adds an atomic write;
:func:`resume` adds a refusal of a checkpoint whose memories were configured differently
(another budget, buffer kind, dataset, method...) or whose memories fail their
check (the digest taken when they were stored, and the core's validator), leaving the
strategy as it was. After resuming, use the returned strategy's plugins, not objects built
before loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcl_dd.io import atomic_write

from .buffers import MemoryBuffer

__all__ = ["memories", "resume", "save"]


def memories(strategy: Any) -> list[Any]:
    """The strategy's storage policies: its own first (Avalanche's ``ER_ACE`` and ``DER`` keep
    one), then those of its replay plugins (ours and Avalanche's), in plugin order."""
    own = [strategy.storage_policy] if hasattr(strategy, "storage_policy") else []
    return own + [
        p.storage_policy for p in getattr(strategy, "plugins", []) if hasattr(p, "storage_policy")
    ]


def _signature(strategy: Any) -> list[dict[str, Any]]:
    out = []
    for memory in memories(strategy):
        if isinstance(memory, MemoryBuffer):
            out.append(memory.config())
        else:
            out.append({"kind": type(memory).__name__, "max_size": memory.max_size})
    return out


def save(strategy: Any, path: str | Path) -> Path:
    """Avalanche's ``save_checkpoint(strategy, path)``, written atomically (between experiences only)."""
    from avalanche.checkpointing import save_checkpoint

    return atomic_write(path, lambda f: save_checkpoint(strategy, f))


def resume(strategy: Any, path: str | Path, map_location: Any = None) -> tuple[Any, int]:
    """Avalanche's ``maybe_load_checkpoint``: the strategy as saved and the next experience to train.

    A missing file returns ``(strategy, 0)``. Raises ``ValueError`` naming the differences
    when the checkpoint's memories are configured unlike ``strategy``'s, or naming the file
    when a memory fails its check; the strategy is then left untouched.
    """
    from avalanche.checkpointing import maybe_load_checkpoint

    path = Path(path)
    expected = _signature(strategy)
    before = dict(strategy.__dict__)
    try:
        strategy, start = maybe_load_checkpoint(strategy, str(path), map_location=map_location)
    except ValueError as exc:
        # A memory buffer refused its memory while being unpickled (MemoryBuffer.__setstate__),
        # before maybe_load_checkpoint touched the strategy.
        raise ValueError(
            f"{path}: a memory fails its check ({exc}); the checkpoint is corrupted, use another "
            "or start without resuming"
        ) from None
    found = _signature(strategy)
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
