"""Flower messages as a SuperLink delivers them (every metadata field set), for tests that call
the ClientApp or the strategy in process."""

from __future__ import annotations

import torch
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.payload import ARRAYS, CONFIG, model_arrays
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict

from fedcl_dd.models import make_model


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


def train_content(cfg: FedConfig, server_round: int) -> RecordDict:
    """What the server sends a client to train: a fresh global model of ``cfg`` and the run
    config for ``server_round``."""
    spec = cfg.preset_obj.spec
    net = make_model(cfg.model, spec.channels, spec.num_classes, spec.image_size, torch.Generator())
    config = ConfigRecord({**cfg.to_dict(), "server-round": server_round})
    return RecordDict({ARRAYS: model_arrays(net), CONFIG: config})


def train_in_process(
    cfg: FedConfig, server_round: int = 1, node_config: dict | None = None
) -> Message:
    """The ClientApp's reply to one train message of ``cfg``, handled in this process by a
    client with a fresh context (as after a restart): partition 1 unless ``node_config`` says."""
    from fedcl_dd.strategies.flower.client_app import app

    node = node_config or {"partition-id": 1, "num-partitions": cfg.preset_obj.num_clients}
    content = train_content(cfg, server_round)
    msg = message(0, 1, content, message_id=f"m{server_round}", group_id=str(server_round))
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    return app(msg, context)
