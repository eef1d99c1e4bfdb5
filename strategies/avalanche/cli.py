"""Placeholder registration; replaced by the adapter's command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this adapter's subcommand to ``fedcl-dd``."""
