"""Every kind of malformed upload is refused with a reason; the run configuration refuses bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.payload import (
    METRICS,
    SYNTHETIC,
    SYNTHETIC_META,
    InvalidUpload,
    model_arrays,
    read_upload,
    synthetic_records,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcl_dd.recipe import Recipe

CFG = FedConfig(preset="digits-iid-4", ipc=5)
METRIC_VALUES = {"num-examples": 100, "partition-id": 0, "upload-bytes": 1, "seconds": 1.0}


@pytest.fixture(scope="module")
def good(digits, digits_sampler):
    syn = Recipe(ipc=5).init_synthetic(
        digits_sampler, digits.spec, torch.Generator().manual_seed(0)
    )
    return syn


def _reply(tensors, meta, metrics=METRIC_VALUES) -> RecordDict:
    return RecordDict(
        {
            SYNTHETIC: ArrayRecord(
                {
                    k: Array.from_numpy_ndarray(np.ascontiguousarray(v.numpy()))
                    for k, v in tensors.items()
                }
            ),
            SYNTHETIC_META: ConfigRecord(dict(meta)),
            METRICS: MetricRecord(dict(metrics)),
        }
    )


def _read(content, digits):
    return read_upload(content, digits.spec, CFG.budget_limit(), max_images=50)


def test_a_good_upload_round_trips(good, digits):
    up = _read(synthetic_records(good, METRIC_VALUES), digits)
    assert torch.equal(up.syn.images(), good.images()) and torch.equal(
        up.syn.class_ids, good.class_ids
    )
    assert up.partition_id == 0


@pytest.mark.parametrize(
    "kind, match",
    [
        ("nan", "NaN"),
        ("inf", "NaN or Inf"),
        ("shape", r"must be float \(N, 1, 8, 8\), got torch.float32 \(50, 1, 4, 8\)"),
        ("dtype", "dtype"),
        ("labels", "label"),
        ("images", "exceed the limit"),
        ("bytes", "budget"),
        ("missing-tensor", "missing"),
        ("missing-record", "lacks record"),
        ("missing-metric", "metrics lack"),
        ("not-a-set", "not a synthetic set"),
        ("other-dataset", "the run uses digits"),
    ],
)
def test_malformed_uploads_are_refused(good, digits, kind, match):
    tensors, meta, metrics = good.state_tensors(), dict(good.metadata()), dict(METRIC_VALUES)
    key = "images"
    if kind == "nan":
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0, 0, 0] = float("nan")
    elif kind == "inf":
        tensors[key] = tensors[key].clone()
        tensors[key][1, 0, 2, 2] = float("inf")
    elif kind == "shape":
        tensors[key] = tensors[key][:, :, :4]
    elif kind == "dtype":
        tensors[key] = tensors[key].double()
    elif kind == "labels":
        labels = next(k for k in tensors if k != key)
        tensors[labels] = tensors[labels].clone()
        tensors[labels][0] = 10
    elif kind in ("images", "bytes"):
        reps = 2 if kind == "images" else 3
        tensors = {k: torch.cat([v] * reps) for k, v in tensors.items()}
        if kind == "bytes":
            content = _reply(tensors, meta, metrics)
            with pytest.raises(InvalidUpload, match=match):
                read_upload(content, digits.spec, CFG.budget_limit(), max_images=None)
            return
    elif kind == "missing-tensor":
        tensors.pop(key)
    elif kind == "missing-record":
        content = synthetic_records(good, metrics)
        del content[SYNTHETIC_META]
        with pytest.raises(InvalidUpload, match=match):
            _read(content, digits)
        return
    elif kind == "missing-metric":
        metrics.pop("num-examples")
    elif kind == "not-a-set":
        from fedcl_dd.models import make_model

        net = make_model("convnet", 1, 10, 8, torch.Generator().manual_seed(0), "cpu")
        content = RecordDict(
            {
                SYNTHETIC: model_arrays(net),
                SYNTHETIC_META: ConfigRecord({"note": "weights"}),
                METRICS: MetricRecord(metrics),
            }
        )
        with pytest.raises(InvalidUpload, match=match):
            _read(content, digits)
        return
    elif kind == "other-dataset":
        meta["image_shape"] = "[1, 16, 16]"
        tensors[key] = torch.nn.functional.interpolate(tensors[key], size=(16, 16))
    with pytest.raises(InvalidUpload, match=match):
        _read(_reply(tensors, meta, metrics), digits)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"algorithm": "fedsgd"}, "algorithm"),
        ({"mode": "one-shot", "rounds": 3}, "one-shot"),
        ({"method": "dm-dp"}, "epsilon"),
        ({"epsilon": 8.0}, "dm-dp"),
        ({"preset": "digits-zz-4"}, "preset"),
        ({"ipcs": 3}, "unknown setting"),
        ({"method": "dm", "constant-memory": True}, "constant-memory do.*not apply to method=dm"),
        ({"real-per-class": 0}, r"real-per-class=0 is outside \[1"),
    ],
)
def test_bad_configs_are_refused(values, match):
    with pytest.raises(ValueError, match=match):
        FedConfig.from_mapping(values)


def test_config_round_trips_through_records():
    cfg = FedConfig(preset="mnist-dir0.5-10", method="dm-dp", epsilon=8.0, rounds=5, ipc=3)
    again = FedConfig.from_mapping(
        {**dict(ConfigRecord(cfg.to_dict())), "server-round": 2}, strict=False
    )
    assert again == cfg
    assert again.planned_iterations == 5 * cfg.iterations  # sigma planned for the whole run
    tuned = FedConfig(method="gm", options={"real-per-class": 32, "distance": "mse"})
    assert FedConfig.from_mapping(tuned.to_dict()) == tuned
    assert tuned.recipe().objective().real_per_class == 32
    zero = FedConfig(
        method="tm", options={"max_start_epoch": 0}
    )  # zero is a value here, not "unset"
    assert FedConfig.from_mapping(zero.to_dict()).options == {"max_start_epoch": 0}


def test_simulate_refuses_bad_settings_before_starting_anything(capsys):
    from fedcl_dd.cli import main

    assert main(["simulate", "--preset", "digits-zz-4"]) == 2
    assert "unknown preset 'digits-zz-4'" in capsys.readouterr().err
    assert main(["simulate", "--mode", "one-shot", "--rounds", "2"]) == 2
    assert "one-shot mode runs exactly one round" in capsys.readouterr().err


def test_pyproject_run_config_lists_every_setting():
    """`flwr run --run-config` only overrides keys that pyproject declares: declare them all."""
    import tomllib
    from pathlib import Path

    from fedcl_dd.strategies.flower.server_app import SERVER_KEYS

    app = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"
    ]
    declared = dict(app["config"])
    assert set(declared) == set(FedConfig().to_dict()) | set(SERVER_KEYS)
    server = {k: declared.pop(k) for k in SERVER_KEYS}
    assert FedConfig.from_mapping(declared).preset == "digits-iid-4" and server["resume"] is False


def test_strategy_refuses_partitions_and_releases_beyond_the_privacy_budget(good):
    from fedcl_dd.strategies.flower.strategy import SyntheticSetStrategy

    from fedcl_dd.privacy import noise_for_target

    cfg = FedConfig(
        preset="digits-iid-4", ipc=5, method="dm-dp", epsilon=8.0, rounds=2, iterations=50
    )
    strategy = SyntheticSetStrategy(cfg)
    sigma = noise_for_target(8.0, cfg.delta, 0.2, 2 * 50)  # planned for both rounds
    private = {**METRIC_VALUES, "noise-multiplier": sigma, "sample-rate": 0.2, "steps": 50}
    up = strategy.validate(synthetic_records(good, private))
    assert up.partition_id == 0
    with pytest.raises(InvalidUpload, match="already uploaded"):
        strategy.validate(synthetic_records(good, private), seen=[0])
    with pytest.raises(InvalidUpload, match="partition-id 7 is outside 0..3"):
        strategy.validate(synthetic_records(good, {**private, "partition-id": 7}))
    with pytest.raises(InvalidUpload, match="account its release"):
        strategy.validate(synthetic_records(good, METRIC_VALUES))
    with pytest.raises(InvalidUpload, match=r"epsilon=\d+.* > budget 8"):
        strategy.validate(
            synthetic_records(good, {**private, "steps": 3 * 50})
        )  # a third round's worth
