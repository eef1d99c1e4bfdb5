"""What travels between server and clients: record keys, and synthetic sets in and out of records.

A reply to a train message carries

- ``"synthetic"``: an ``ArrayRecord`` of the set's stored tensors (``SyntheticSet.state_tensors``),
- ``"synthetic-meta"``: a ``ConfigRecord`` of its string metadata,
- ``"metrics"``: a ``MetricRecord`` with at least :data:`REQUIRED_METRICS`.

:func:`read_upload` turns such a reply back into a validated set, or raises
:class:`InvalidUpload` naming the first problem; nothing in a reply is unpickled.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedcl_dd.data import DatasetSpec
from fedcl_dd.privacy import PrivacyLedger
from fedcl_dd.synthetic import InvalidSyntheticSet, SyntheticSet

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "REQUIRED_METRICS",
    "SYNTHETIC",
    "SYNTHETIC_META",
    "InvalidUpload",
    "Upload",
    "load_model_arrays",
    "model_arrays",
    "read_upload",
    "synthetic_records",
]

ARRAYS, CONFIG = "arrays", "config"  # the keys Flower's own strategies use for the global model
SYNTHETIC, SYNTHETIC_META, METRICS = "synthetic", "synthetic-meta", "metrics"
REQUIRED_METRICS = ("num-examples", "partition-id", "upload-bytes", "seconds")


class InvalidUpload(ValueError):
    """A client's reply is not an acceptable synthetic set; the message says why."""


class Upload:
    """An accepted reply: the set and the client's metrics."""

    def __init__(self, syn: SyntheticSet, metrics: dict[str, float]) -> None:
        self.syn = syn
        self.metrics = metrics
        self.ledger: PrivacyLedger | None = (
            None  # private runs: the client's ledger with this release
        )

    @property
    def partition_id(self) -> int:
        return int(self.metrics["partition-id"])


def synthetic_records(syn: SyntheticSet, metrics: dict[str, float]) -> RecordDict:
    """The content of a client's train reply."""
    return RecordDict(
        {
            SYNTHETIC: ArrayRecord(OrderedDict(syn.state_tensors())),
            SYNTHETIC_META: ConfigRecord(dict(syn.metadata())),
            METRICS: MetricRecord(metrics),
        }
    )


def read_upload(
    content: RecordDict, spec: DatasetSpec, max_bytes: int, max_images: int | None = None
) -> Upload:
    """Validate a train reply against the run's dataset and budget; raise :class:`InvalidUpload`."""
    missing = [k for k in (SYNTHETIC, SYNTHETIC_META, METRICS) if k not in content]
    if missing:
        raise InvalidUpload(
            f"reply lacks record(s) {missing}; expected {SYNTHETIC!r}, {SYNTHETIC_META!r}, {METRICS!r}"
        )
    arrays, meta, metrics = content[SYNTHETIC], content[SYNTHETIC_META], content[METRICS]
    if (
        not isinstance(arrays, ArrayRecord)
        or not isinstance(meta, ConfigRecord)
        or not isinstance(metrics, MetricRecord)
    ):
        raise InvalidUpload(
            f"records have the wrong types: {SYNTHETIC!r} {type(arrays).__name__}, {SYNTHETIC_META!r} "
            f"{type(meta).__name__}, {METRICS!r} {type(metrics).__name__}"
        )
    absent = [k for k in REQUIRED_METRICS if k not in metrics]
    if absent:
        raise InvalidUpload(f"metrics lack {absent}")
    if not all(isinstance(v, str) for v in meta.values()):
        raise InvalidUpload(f"{SYNTHETIC_META!r} must hold strings only")
    try:
        tensors = {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}
    except Exception as exc:  # a malformed Array (bad dtype string, truncated bytes) fails in numpy
        raise InvalidUpload(f"arrays do not decode: {exc}") from exc
    declared = (meta.get("num_classes"), meta.get("image_shape"))
    expected = (str(spec.num_classes), json.dumps(list(spec.image_shape)))
    if all(isinstance(v, str) for v in declared) and (
        declared[0],
        declared[1].replace(" ", ""),
    ) != (expected[0], expected[1].replace(" ", "")):
        raise InvalidUpload(
            f"set of {declared[0]} classes of {declared[1]} images, but the run uses {spec.name}: "
            f"{spec.num_classes} classes of {list(spec.image_shape)}"
        )
    try:
        syn = SyntheticSet.from_state(
            tensors, dict(meta), max_bytes=max_bytes, max_images=max_images
        )
    except InvalidSyntheticSet as exc:
        raise InvalidUpload(str(exc)) from exc
    return Upload(syn, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def model_arrays(model: nn.Module) -> ArrayRecord:
    """The global model as Flower's strategies carry it."""
    return ArrayRecord(model.state_dict())


def load_model_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load ``arrays`` into ``model`` (strictly: the keys and shapes must match)."""
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in arrays.to_torch_state_dict().items()})
    return model
