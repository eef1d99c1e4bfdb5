"""Flower messages as a SuperLink delivers them (every metadata field set), for tests that call
the ClientApp or the strategy in process."""

from __future__ import annotations

from flwr.app import Error, Message, Metadata, RecordDict


def message(
    src: int,
    dst: int,
    content: RecordDict | None,
    message_id: str = "",
    reply_to: str = "",
    group_id: str = "1",
) -> Message:
    """A train message (or, with ``content=None``, an error reply) from ``src`` to ``dst``."""
    meta = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id=group_id,
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    if content is None:
        return Message(metadata=meta, error=Error(code=7, reason="client crashed"))
    return Message(metadata=meta, content=content)
