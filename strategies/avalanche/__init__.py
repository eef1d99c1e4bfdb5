"""Avalanche adapters: rehearsal buffers of fixed bytes and the plugin that replays them.

Names are imported on first use, so that ``fedcl-dd --help`` (which loads this package's
``cli`` module) does not import Avalanche.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MemoryBuffer": ".buffers",
    "PixelBuffer": ".buffers",
    "MultiFormationBuffer": ".buffers",
    "CompressedRealBuffer": ".buffers",
    "AddressingBuffer": ".buffers",
    "MemoryReplayPlugin": ".plugin",
    "save": ".checkpoint",
    "resume": ".checkpoint",
    "RunConfig": ".runner",
    "run_stream": ".runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
