"""Flower adapters: the ClientApp that uploads synthetic sets and the strategy that trains on them.

``flwr run .`` uses :data:`server_app.app` and :data:`client_app.app`; ``fedcl-dd simulate``
and :func:`simulation.simulate` run the same apps on the Ray backend.
"""

from .config import FedConfig
from .strategy import SyntheticSetStrategy

__all__ = ["FedConfig", "SyntheticSetStrategy"]
