"""The named target rows every benchmark JSON carries in its ``"targets"`` list."""

from __future__ import annotations

from typing import Any


def target(
    name: str, value: float | None, target: float, op: str, unit: str, command: str
) -> dict[str, Any]:
    """One row: ``value`` (None: not reached) against ``target`` under ``op`` (>=, <=, >, <)."""
    if op not in (">=", "<=", ">", "<"):
        raise ValueError(f"op must be one of >=, <=, >, <; got {op!r}")
    return {
        "name": name,
        "value": value,
        "target": target,
        "op": op,
        "unit": unit,
        "command": command,
    }
