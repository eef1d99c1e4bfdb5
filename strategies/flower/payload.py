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
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedcl_dd.data import DatasetSpec
from fedcl_dd.synthetic import InvalidSyntheticSet, SyntheticSet

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "PIXEL_RANGE_FACTOR",
    "REQUIRED_METRICS",
    "SYNTHETIC",
    "SYNTHETIC_META",
    "InvalidUpload",
    "Upload",
    "load_model_arrays",
    "max_pixel",
    "metric_float",
    "metric_int",
    "model_arrays",
    "read_upload",
    "synthetic_records",
]

ARRAYS, CONFIG = "arrays", "config"  # the keys Flower's own strategies use for the global model
SYNTHETIC, SYNTHETIC_META, METRICS = "synthetic", "synthetic-meta", "metrics"
#: How far beyond the dataset's own range (normalized units) an upload's pixels may go: real
#: pixels in [0, 1] normalize to within a few units; distilled images stray a little beyond.
PIXEL_RANGE_FACTOR = 100.0


def max_pixel(spec: DatasetSpec) -> float:
    """The largest pixel magnitude an upload may hold: :data:`PIXEL_RANGE_FACTOR` times the
    largest magnitude a real pixel in [0, 1] takes after the dataset's normalization -- far
    beyond any image distillation produces, far below what makes training overflow."""
    extreme = max(float(bound.abs().max()) for bound in spec.pixel_bounds())
    return PIXEL_RANGE_FACTOR * extreme


REQUIRED_METRICS = ("num-examples", "partition-id", "seconds")


class InvalidUpload(ValueError):
    """A client's reply is not an acceptable synthetic set; the message says why."""


class Upload:
    """A reply that decoded into a valid set: the set and the client's numeric metrics.

    ``partition_id`` is the client's claim, checked to be an integer; ``nbytes`` is what the
    server received (the set's stored bytes), not what the client says it sent.
    """

    def __init__(self, syn: SyntheticSet, metrics: dict[str, float]) -> None:
        self.syn = syn
        self.metrics = metrics
        self.partition_id = metric_int(metrics, "partition-id")
        self.nbytes = int(syn.nbytes)
        self.seconds = metric_float(metrics, "seconds", low=0.0)
        self.node: int | None = None  # the node it came from, once the server knows it


def metric_float(metrics: Mapping[str, Any], key: str, low: float | None = None) -> float:
    """``metrics[key]`` as a finite float (at least ``low``); :class:`InvalidUpload` otherwise."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidUpload(f"metric {key!r} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise InvalidUpload(f"metric {key!r} must be at least {low:g}, got {value!r}")
    return float(value)


def metric_int(metrics: Mapping[str, Any], key: str, low: int = 0) -> int:
    """``metrics[key]`` as an integer of at least ``low`` (1.0 passes, 1.5 does not)."""
    value = metric_float(metrics, key, low)
    if not value.is_integer():
        raise InvalidUpload(f"metric {key!r} must be a whole number, got {metrics[key]!r}")
    return int(value)


def synthetic_records(syn: SyntheticSet, metrics: dict[str, float]) -> RecordDict:
    """The content of a client's train reply."""
    return RecordDict(
        {
            SYNTHETIC: ArrayRecord(OrderedDict(syn.state_tensors())),
            SYNTHETIC_META: ConfigRecord(dict(syn.metadata())),
            METRICS: MetricRecord({**metrics}),
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
    text = {k: v for k, v in meta.items() if isinstance(v, str)}
    if len(text) != len(meta):
        raise InvalidUpload(f"{SYNTHETIC_META!r} must hold strings only")
    try:
        tensors = {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}
    except Exception as exc:  # a malformed Array (bad dtype string, truncated bytes) fails in numpy
        raise InvalidUpload(f"arrays do not decode: {exc}") from exc
    classes, shape = text.get("num_classes"), text.get("image_shape")
    if (
        classes is not None
        and shape is not None
        and (classes, shape.replace(" ", ""))
        != (str(spec.num_classes), json.dumps(list(spec.image_shape)).replace(" ", ""))
    ):
        raise InvalidUpload(
            f"set of {classes} classes of {shape} images, but the run uses {spec.name}: "
            f"{spec.num_classes} classes of {list(spec.image_shape)}"
        )
    try:
        syn = SyntheticSet.from_state(tensors, text, max_bytes=max_bytes, max_images=max_images)
    except InvalidSyntheticSet as exc:
        raise InvalidUpload(str(exc)) from exc
    with torch.no_grad():
        peak = float(syn.images().abs().max()) if syn.num_images else 0.0
    bound = max_pixel(spec)
    if not peak <= bound:  # also catches an overflow to inf when a memory is materialized
        raise InvalidUpload(
            f"pixel values reach {peak:.3g}; images in {spec.name}'s normalized space stay "
            f"within ±{bound:.4g} ({PIXEL_RANGE_FACTOR:g}x the range of its real pixels)"
        )
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    metric_int(numbers, "num-examples")
    return Upload(syn, numbers)


def model_arrays(model: nn.Module) -> ArrayRecord:
    """The global model as Flower's strategies carry it."""
    return ArrayRecord(model.state_dict())


def load_model_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load ``arrays`` into ``model`` (strictly: the keys and shapes must match)."""
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in arrays.to_torch_state_dict().items()})
    return model
