"""Writing files so that a crash never leaves a half-written one where a reader looks, and
checkpoints that are verified before anything in them is used."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "CorruptCheckpoint",
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
    "temp_sibling",
    "write_json",
]

# A checkpoint is this line, the SHA-256 of the payload in hex and a newline, then the payload:
# ``torch.save`` of plain containers, tensors and numbers (loaded with ``weights_only=True``).
_MAGIC = b"fedcl-dd checkpoint 1\n"


class CorruptCheckpoint(ValueError):
    """A checkpoint that is missing its header, truncated, altered or not one of ours."""


def temp_sibling(target: Path) -> Path:
    """A fresh hidden name next to ``target`` for writing it under. Not tempfile's mkstemp /
    mkdtemp: those create mode 0600 / 0700, which would make a shared data root unreadable
    to others; a plain open / mkdir honours the umask."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.part")


def atomic_write(
    target: str | Path,
    write: Callable[[BinaryIO], object],
    check: Callable[[Path], bool] | None = None,
) -> Path:
    """Write ``target`` through a temporary file in the same folder and rename it into place,
    so readers never see a partial file and an old ``target`` survives a failed write;
    ``check`` vets the temporary file first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        with open(tmp, "xb") as f:
            write(f)
        if check is not None and not check(tmp):
            raise ValueError(f"{target}: the written data is incomplete or malformed")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2).encode()
    return atomic_write(path, lambda f: f.write(data))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically, with a
    checksum that :func:`load_checkpoint` verifies."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    return atomic_write(path, lambda f: f.write(_MAGIC + digest + b"\n" + payload))


def load_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote to ``path``, once its header and checksum hold;
    :class:`CorruptCheckpoint` (one line naming the path) otherwise. Only plain data is
    unpickled (``weights_only=True``), whatever the file holds."""
    path = Path(path)
    data = path.read_bytes()
    head, digest = data[: len(_MAGIC)], data[len(_MAGIC) : len(_MAGIC) + 64]
    if head != _MAGIC:
        raise CorruptCheckpoint(f"{path} is not a fedcl-dd checkpoint (no header)")
    payload = data[len(_MAGIC) + 65 :]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptCheckpoint(f"{path} is truncated or altered (its checksum does not match)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch's own message would suggest unpickling arbitrary code
        raise CorruptCheckpoint(
            f"{path} holds data that is not plain tensors and numbers ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path} does not hold a checkpoint's mapping")
    return state
