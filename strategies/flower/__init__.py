"""Flower adapters: the ClientApp that uploads synthetic sets and the strategy that trains on them.

``flwr run .`` uses :data:`server_app.app` and :data:`client_app.app`; ``fedcl-dd simulate``
and :func:`simulation.simulate` run the same apps on the Ray backend.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FedConfig", "SyntheticSetStrategy"]


def __getattr__(name: str) -> Any:
    # Lazy: `fedcl-dd --help` loads this package's CLI registration without importing Flower.
    if name == "FedConfig":
        from .config import FedConfig

        return FedConfig
    if name == "SyntheticSetStrategy":
        from .strategy import SyntheticSetStrategy

        return SyntheticSetStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
