"""Writing files so that a crash never leaves a half-written one where a reader looks."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "temp_sibling", "write_json"]


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
