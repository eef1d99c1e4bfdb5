"""Which node holds which partition, as the server has seen it.

A reply's ``partition-id`` is a claim. The server binds each partition to the first node
that claims it and each node to the first partition it claims (trust on first use, for the
life of this server process: a resumed server, whose nodes may have new ids, binds anew).
Afterwards a node claiming another node's partition, or a second partition, is refused
before anything is booked against the claimed partition's privacy budget.
"""

from __future__ import annotations

from .payload import InvalidUpload

__all__ = ["PartitionBindings"]


class PartitionBindings:
    """Partition <-> node bindings made at first claim (see the module docstring)."""

    def __init__(self) -> None:
        self.node_of: dict[int, int] = {}
        self.partition_of: dict[int, int] = {}

    def claim(self, node: int, partition: int) -> None:
        """Accept ``node``'s claim to ``partition`` (binding both if new); :class:`InvalidUpload`
        naming the binding it contradicts otherwise."""
        owner = self.node_of.get(partition)
        if owner is not None and owner != node:
            raise InvalidUpload(
                f"node {node} claims partition {partition}, which node {owner} holds "
                f"(bound at its first reply)"
            )
        held = self.partition_of.get(node)
        if held is not None and held != partition:
            raise InvalidUpload(
                f"node {node} claims partition {partition} but holds partition {held} "
                f"(bound at its first reply)"
            )
        self.node_of[partition] = node
        self.partition_of[node] = partition
