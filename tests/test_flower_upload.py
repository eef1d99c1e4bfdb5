"""Every kind of malformed upload is refused with a reason; the run configuration refuses bad settings."""

from __future__ import annotations

import math

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
from flower_messages import message
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
        ("huge", r"pixel values reach 3e\+38"),
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
    elif kind == "huge":  # finite, so it passes the NaN check, but would overflow training
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0, 0, 0] = 3e38
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
    up = strategy.admit(synthetic_records(good, private))
    assert up.partition_id == 0
    with pytest.raises(InvalidUpload, match="already uploaded"):
        strategy.admit(synthetic_records(good, private), seen=[0])
    with pytest.raises(InvalidUpload, match="partition-id 7 is outside 0..3"):
        strategy.admit(synthetic_records(good, {**private, "partition-id": 7}))
    with pytest.raises(InvalidUpload, match="account its release"):
        strategy.admit(synthetic_records(good, METRIC_VALUES))
    with pytest.raises(InvalidUpload, match=r"epsilon=\d+.* > budget 8"):
        strategy.admit(
            synthetic_records(good, {**private, "steps": 3 * 50})
        )  # a third round's worth
    # Every release that decoded was booked, the refused ones too: the server received them.
    assert strategy.ledgers[0].steps == 50 + 50 + 3 * 50
    for bad in ({"steps": 0}, {"steps": 2.7}, {"steps": float("inf")}, {"sample-rate": 1.5}):
        with pytest.raises(InvalidUpload, match="steps|sample_rate"):
            strategy.admit(synthetic_records(good, {**private, "partition-id": 1, **bad}))
    assert 1 not in strategy.ledgers  # nothing unaccountable is booked


_NOT_AN_INDEX = st.one_of(
    st.floats().filter(lambda v: not (math.isfinite(v) and v.is_integer() and v >= 0)),
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
    st.integers(max_value=-1),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(["partition-id", "num-examples", "seconds"]), value=_NOT_AN_INDEX)
def test_metrics_that_are_not_counts_are_refused_with_their_name(good, digits, key, value):
    if key == "seconds" and isinstance(value, float) and math.isfinite(value) and value >= 0:
        return  # any finite non-negative number of seconds is fine
    content = synthetic_records(good, {**METRIC_VALUES, key: value})
    with pytest.raises(InvalidUpload, match=f"metric '{key}'"):
        _read(content, digits)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pid=st.integers(0, 3), claimed=st.one_of(st.integers(), st.floats(allow_nan=True)))
def test_received_bytes_are_measured_not_claimed(good, digits, pid, claimed):
    up = _read(
        synthetic_records(good, {**METRIC_VALUES, "partition-id": pid, "upload-bytes": claimed}),
        digits,
    )
    assert up.nbytes == good.nbytes and up.partition_id == pid


def test_collect_replies_sorts_out_errors_strangers_repeats_and_silence(good):
    from fedcl_dd.strategies.flower.strategy import RoundReport, collect_replies

    def reply(to: str, node: int, error: bool = False) -> Message:
        content = None if error else synthetic_records(good, METRIC_VALUES)
        return message(node, 0, content, reply_to=to)

    sent = {"a": 11, "b": 12, "c": 13, "d": 14}
    report = RoundReport(round=1)
    kept = collect_replies(
        [
            reply("a", 11),
            reply("a", 11),
            reply("b", 12, error=True),
            reply("zz", 99),
            reply("c", 13),
        ],
        sent,
        report,
    )
    assert [node for node, _ in kept] == [11, 13]
    assert {(r["node"], r["reason"]) for r in report.rejected} == {
        (11, "second reply to one message"),
        (99, "reply to a message this round did not send"),
    }
    assert [(f["node"], f["reason"]) for f in report.failed] == [
        (12, "error 7: client crashed"),
        (14, "no reply before the round timeout"),
    ]


def test_a_non_finite_model_is_never_adopted(good, monkeypatch):
    from fedcl_dd.strategies.flower.payload import Upload
    from fedcl_dd.strategies.flower.strategy import RoundReport, SyntheticSetStrategy

    strategy = SyntheticSetStrategy(CFG)
    real_train = strategy._train_global

    def poisoned(r, images, targets):
        net = real_train(r, images, targets)
        with torch.no_grad():
            next(net.parameters()).fill_(float("nan"))
        return net

    monkeypatch.setattr(strategy, "_train_global", poisoned)
    report = RoundReport(round=1)
    assert strategy.train_on_pool(1, [Upload(good, METRIC_VALUES)], report) is None
    assert report.kept_previous_model and "non-finite" in report.note
    assert "partitions [0]" in report.note  # the round's uploads are named


def _round(strategy, replies_by_node: dict[int, RecordDict | None], server_round: int = 1):
    """``aggregate_train`` on one reply per node, each to a message the strategy sent."""
    strategy._outgoing = [
        message(0, node, RecordDict(), message_id=f"r{server_round}-n{node}")
        for node in replies_by_node
    ]
    replies = [
        message(node, 0, content, reply_to=f"r{server_round}-n{node}")
        for node, content in replies_by_node.items()
    ]
    return strategy.aggregate_train(server_round, replies)


def test_a_node_cannot_claim_another_nodes_partition_or_spend_its_budget(good):
    from fedcl_dd.strategies.flower.strategy import SyntheticSetStrategy

    from fedcl_dd.privacy import noise_for_target

    cfg = FedConfig(
        preset="digits-iid-4",
        ipc=5,
        method="dm-dp",
        epsilon=8.0,
        rounds=2,
        iterations=50,
        server_epochs=1,
    )
    strategy = SyntheticSetStrategy(cfg)
    sigma = noise_for_target(8.0, cfg.delta, 0.2, 2 * 50)
    private = {**METRIC_VALUES, "noise-multiplier": sigma, "sample-rate": 0.2, "steps": 50}

    def claim(pid: int) -> RecordDict:
        return synthetic_records(good, {**private, "partition-id": pid})

    _round(strategy, {11: claim(0), 12: claim(1)}, 1)
    assert strategy.reports[-1].accepted == [0, 1]
    # Round 2: node 13 claims partition 0 (node 11's); node 12 switches to partition 2.
    _round(strategy, {13: claim(0), 12: claim(2), 11: claim(0)}, 2)
    report = strategy.reports[-1]
    reasons = {r["node"]: r["reason"] for r in report.rejected}
    assert report.accepted == [0]
    assert "which node 11 holds" in reasons[13] and "holds partition 1" in reasons[12]
    # Only node 11's two releases were booked against partition 0, none against partition 2.
    assert strategy.ledgers[0].steps == 100 and 2 not in strategy.ledgers


_BAD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
)


@st.composite
def _hostile_reply(draw, good_records: RecordDict) -> RecordDict:
    """A reply built from a good one with any of its records, keys and values replaced."""
    records = {}
    for name in draw(st.sets(st.sampled_from([SYNTHETIC, SYNTHETIC_META, METRICS, "extra"]))):
        kind = draw(st.sampled_from(["array", "config", "metric", "keep"]))
        if kind == "keep" and name in good_records:
            original = good_records[name]
            if isinstance(original, ArrayRecord):
                arrays = {
                    k: a.numpy() for k, a in original.items()
                }  # then perturb one array's values or shape
                key = draw(st.sampled_from(sorted(arrays)))
                how = draw(st.sampled_from(["scale", "nan", "reshape", "dtype"]))
                a = arrays[key]
                if how == "scale":
                    a = a * draw(st.floats(-1e38, 1e38, allow_nan=False))
                elif how == "nan" and a.dtype.kind == "f":
                    a = a.copy()
                    a.flat[0] = np.nan
                elif how == "reshape":
                    a = a.reshape(-1)
                elif how == "dtype":
                    a = a.astype(draw(st.sampled_from([np.float64, np.int8, np.uint8, np.float16])))
                arrays[key] = a
                records[name] = ArrayRecord(
                    {
                        k: Array.from_numpy_ndarray(np.ascontiguousarray(v))
                        for k, v in arrays.items()
                    }
                )
            elif isinstance(original, ConfigRecord):
                values = dict(original)
                key = draw(st.sampled_from(sorted(values)))
                values[key] = draw(st.text(max_size=30) | st.sampled_from(["[1, 1, 1]", "{}", "9"]))
                records[name] = ConfigRecord(values)
            else:
                values = dict(original)
                key = draw(st.sampled_from(sorted(values)))
                # MetricRecord itself refuses None, bools and strings.
                value = draw(
                    _BAD_VALUES.filter(lambda v: v is not None and not isinstance(v, (bool, str)))
                )
                if isinstance(value, list) and not value:
                    value = [0]
                values[key] = value
                records[name] = MetricRecord(values)
        elif kind == "array":
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
            records[name] = ArrayRecord(
                {"images": Array.from_numpy_ndarray(np.zeros(shape, dtype=np.float32))}
            )
        elif kind == "config":
            records[name] = ConfigRecord({"kind": draw(st.text(max_size=10))})
        else:
            records[name] = MetricRecord({"partition-id": draw(st.integers(-5, 5))})
    return RecordDict(records)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_nothing_a_client_sends_escapes_aggregate_train(good, data):
    """Arbitrary replies beside one good one: aggregate_train never raises, every refusal has
    a reason, the good upload is accepted and the model stays finite."""
    from fedcl_dd.strategies.flower.strategy import SyntheticSetStrategy

    strategy = SyntheticSetStrategy(FedConfig(preset="digits-iid-4", ipc=5, server_epochs=1))
    good_records = synthetic_records(good, {**METRIC_VALUES, "partition-id": 3})
    hostile = data.draw(st.lists(_hostile_reply(good_records), min_size=1, max_size=3))
    replies = {10: good_records} | {20 + i: r for i, r in enumerate(hostile)}
    arrays, metrics = _round(strategy, replies)
    report = strategy.reports[-1]
    assert 3 in report.accepted and metrics is not None
    assert all(r["reason"] for r in report.rejected)
    assert len(report.accepted) + len(report.rejected) == len(replies)
    assert arrays is not None
    assert all(torch.isfinite(torch.from_numpy(a.numpy())).all() for a in arrays.values())


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ratio=st.floats(0.05, 0.999) | st.floats(1.001, 20.0))
def test_the_pixel_bound_follows_the_datasets_normalization(good, digits, ratio):
    """An upload whose largest pixel is ``ratio`` times the bound passes iff ratio < 1 (the
    band around 1 is left to float32 rounding)."""
    from fedcl_dd.strategies.flower.payload import PIXEL_RANGE_FACTOR, max_pixel

    spec = digits.spec
    real_extreme = float(spec.normalize(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)).abs().max())
    assert max_pixel(spec) == pytest.approx(PIXEL_RANGE_FACTOR * real_extreme)
    images = good.images().detach()
    scaled = images / images.abs().max() * (ratio * max_pixel(spec))
    tensors = {**good.state_tensors(), "images": scaled}
    content = _reply(tensors, good.metadata())
    if ratio <= 1.0:
        assert _read(content, digits).syn.num_images == good.num_images
    else:
        with pytest.raises(InvalidUpload, match="pixel values reach"):
            _read(content, digits)


def test_a_collapsed_model_is_never_adopted(good, monkeypatch):
    """A model that answers one class for every pooled image (e.g. after a set scaled to
    dominate the union) is discarded like a non-finite one."""
    from fedcl_dd.strategies.flower.payload import Upload
    from fedcl_dd.strategies.flower.strategy import RoundReport, SyntheticSetStrategy

    strategy = SyntheticSetStrategy(FedConfig(preset="digits-iid-4", ipc=5, server_epochs=1))
    real_train = strategy._train_global

    def collapsed(r, images, targets):
        net = real_train(r, images, targets)
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.arange(last.bias.numel(), dtype=last.bias.dtype))
        return net

    report = RoundReport(round=1)
    assert strategy.train_on_pool(1, [Upload(good, METRIC_VALUES)], report) is not None
    monkeypatch.setattr(strategy, "_train_global", collapsed)
    report = RoundReport(round=2)
    assert strategy.train_on_pool(2, [Upload(good, METRIC_VALUES)], report) is None
    assert report.kept_previous_model and "collapsed model (class 9" in report.note


def test_the_screen_refuses_a_label_permuted_upload_and_the_round_goes_on(digits, digits_sampler):
    from fedcl_dd.strategies.flower.strategy import SyntheticSetStrategy

    from fedcl_dd.synthetic import PixelSet

    cfg = CFG.replace(screen=0.5, server_epochs=1)
    sets = [
        Recipe(ipc=5).init_synthetic(digits_sampler, digits.spec, torch.Generator().manual_seed(s))
        for s in range(4)
    ]
    with torch.no_grad():
        permuted = PixelSet(sets[3].images(), (sets[3].targets() + 1) % 10, 10)
    replies = {
        10 + pid: synthetic_records(syn, {**METRIC_VALUES, "partition-id": pid})
        for pid, syn in enumerate([*sets[:3], permuted])
    }
    strategy = SyntheticSetStrategy(cfg)
    arrays, _ = _round(strategy, replies)
    report = strategy.reports[-1]
    assert arrays is not None and report.accepted == [0, 1, 2]
    assert [(r["node"], r["partition"]) for r in report.rejected] == [(13, 3)]
    assert "screened out" in report.rejected[0]["reason"]
    assert report.screen_scores[3] < 0.5 <= min(report.screen_scores[p] for p in (0, 1, 2))
    assert 3 not in strategy.pool  # a refused set never enters the pool
    # With the screen off (the default), the same round admits all four.
    plain = SyntheticSetStrategy(CFG.replace(server_epochs=1))
    _round(plain, replies)
    assert plain.reports[-1].accepted == [0, 1, 2, 3] and plain.reports[-1].screen_scores == {}


def test_bf16_server_training_runs_and_a_bad_precision_is_refused(good):
    from fedcl_dd.strategies.flower.strategy import SyntheticSetStrategy

    with pytest.raises(ValueError, match="precision must be one of"):
        CFG.replace(precision="fp8")
    with pytest.raises(ValueError, match="compile must be one of .*'default'.* or empty"):
        CFG.replace(compile="fast")
    strategy = SyntheticSetStrategy(CFG.replace(precision="bf16", server_epochs=1))
    arrays, _ = _round(strategy, {10: synthetic_records(good, METRIC_VALUES)})
    assert arrays is not None and strategy.reports[-1].accepted == [METRIC_VALUES["partition-id"]]
    weights = arrays.to_torch_state_dict()
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_sent_bytes_counts_configs_as_flower_does_and_takes_empty_text():
    from fedcl_dd.strategies.flower.strategy import sent_bytes
    from flwr.app import ConfigRecord

    full = FedConfig().to_dict()
    assert "" in full.values()  # an unset text option: Flower's own count_bytes raises on it
    nonempty = ConfigRecord({k: v for k, v in full.items() if v != ""})
    assert sent_bytes(nonempty) == nonempty.count_bytes()
    empty_keys = sum(len(k) for k, v in full.items() if v == "")
    assert sent_bytes(ConfigRecord(full)) == nonempty.count_bytes() + empty_keys
