"""Seeds shared by the ClientApp and the server: one per (run seed, round, partition)."""

from __future__ import annotations

import zlib

__all__ = ["SERVER_ID", "client_seed"]

SERVER_ID = (
    -1
)  # the partition slot of the server's own draws (node sampling, initial model, training)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed for one client's work in one round: the same in every process and after a restart."""
    return zlib.crc32(f"{seed}/{server_round}/{partition_id}".encode())
