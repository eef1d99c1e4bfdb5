"""Rehearsal from byte-bounded memories with real Avalanche strategies on SplitDigits (issue 3, section 6).

Budgets are the bytes of N labelled 8x8 digit images (258 B each). Distillation runs
few, small iterations so that the module stays within its time budget.
"""

from __future__ import annotations

import statistics

import pytest
import torch

pytest.importorskip("avalanche")

from fedcl_dd.strategies.avalanche.buffers import AddressingBuffer, PixelBuffer
from fedcl_dd.strategies.avalanche.checkpoint import memories, resume, save
from fedcl_dd.strategies.avalanche.plugin import MemoryReplayPlugin
from fedcl_dd.strategies.avalanche.runner import (
    RunConfig,
    make_learner,
    make_memory,
    make_strategy,
    run_stream,
)

from fedcl_dd.data import SPECS
from fedcl_dd.synthetic import bytes_per_image

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = SPECS["digits"]
IMAGE = bytes_per_image(SPEC.image_shape)  # 258 bytes
FAST = dict(iterations=3, real_per_class=32)


@pytest.fixture(scope="module")
def streams():
    """SplitDigits for seeds 0 and 1 (5 experiences of 2 classes)."""
    from fedcl_dd.scenarios.continual import make_benchmark

    return {seed: make_benchmark("split-digits", seed=seed) for seed in (0, 1)}


def _by_class(digits, classes):
    keep = torch.isin(digits.train_y, torch.tensor(classes))
    return digits.train_x[keep], digits.train_y[keep]


def _state(buffer):
    return (
        {k: v.clone() for k, v in buffer.syn.state_tensors().items()}
        if buffer.syn is not None
        else {}
    )


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distilled_pixels_beat_reservoir_at_equal_bytes(streams):
    """Mean final accuracy over two seeds, both memories at the bytes of 20 images, same learner and mix."""
    common = dict(
        benchmark="split-digits", budget_images=20, epochs=3, train_mb_size=10, batch_size_mem=10
    )
    acc = {"replay": [], "pixels": []}
    for seed, bench in streams.items():
        for buffer in acc:
            result = run_stream(RunConfig(buffer=buffer, seed=seed, **common, **FAST), bench)
            acc[buffer].append(result.final_accuracy)
    distilled, reservoir = (
        statistics.fmean(acc["pixels"]),
        statistics.fmean(acc["replay"]),
    )
    assert distilled > reservoir + 0.03, acc


@pytest.mark.parametrize("kind", [PixelBuffer, AddressingBuffer])
def test_bytes_never_exceed_the_budget_across_the_stream(digits, kind):
    budget = 30 * IMAGE
    buffer = kind(budget, SPEC, **FAST)
    held = []
    for classes in ([0, 1], [2, 3], [4, 5], [6, 7], [8, 9]):
        buffer.add(*_by_class(digits, classes), expected=classes)
        held += classes
        assert buffer.classes == held
        assert 0 < buffer.nbytes <= budget
        # What a file of the memory holds: the honest size, labels included.
        assert buffer.nbytes == sum(
            t.numel() * t.element_size() for t in buffer.syn.state_tensors().values()
        )
        assert len(buffer.buffer) <= buffer.max_size
    assert len(buffer.build_seconds) == 5


def test_addressing_replays_more_distinct_samples_than_pixels(digits):
    budget = 50 * IMAGE
    pixels, addressing = PixelBuffer(budget, SPEC, **FAST), AddressingBuffer(budget, SPEC, **FAST)
    for classes in ([0, 1], [2, 3], [4, 5], [6, 7], [8, 9]):
        for buffer in (pixels, addressing):
            buffer.add(*_by_class(digits, classes))
    assert addressing.nbytes <= budget and pixels.nbytes <= budget
    assert pixels.distinct_samples() <= 50
    assert addressing.distinct_samples() > 2 * pixels.distinct_samples()


def test_plugin_composes_with_ewc_and_the_evaluation_plugin(streams):
    result = run_stream(
        RunConfig(
            benchmark="split-digits",
            buffer="pixels",
            strategy="ewc",
            budget_images=50,
            epochs=3,
            train_mb_size=10,
            batch_size_mem=10,
            **FAST,
        ),
        streams[0],
    )
    assert len(result.accuracy_after) == 5
    assert result.final_accuracy > 0.6  # 0.2 would mean the old classes were forgotten
    assert 0.0 <= result.forgetting < 0.5


def test_storage_policy_works_inside_avalanches_replay_plugin(streams):
    from avalanche.training.plugins import ReplayPlugin

    from fedcl_dd.models import make_model

    buffer = PixelBuffer(20 * IMAGE, SPEC, **FAST)
    plugin = ReplayPlugin(mem_size=buffer.max_size, batch_size_mem=10, storage_policy=buffer)
    model = make_model("mlp", 1, 10, 8, torch.Generator().manual_seed(0))
    strategy = make_strategy(RunConfig(epochs=1), model, [plugin])
    for exp in streams[0].train_stream[:2]:
        strategy.train(exp)
    assert buffer.classes == sorted(streams[0].class_order[:4])
    assert len(buffer.buffer) == 20 and buffer.nbytes <= 20 * IMAGE


def test_checkpoint_round_trip_is_bit_exact_and_continues(streams, tmp_path):
    bench = streams[0]
    path = tmp_path / "ckpt.pkl"
    cfg = RunConfig(benchmark="split-digits", buffer="addressing", budget_images=20, **FAST)

    def fresh_strategy(config):
        from fedcl_dd.strategies.avalanche.runner import make_memory

        from fedcl_dd.models import make_model

        model = make_model("mlp", 1, 10, 8, torch.Generator().manual_seed(0))
        plugin, _ = make_memory(config, bench, model)
        return make_strategy(config, model, [plugin])

    first = fresh_strategy(cfg)
    for exp in bench.train_stream[:2]:
        first.train(exp)
    save(first, path)
    saved = _state(memories(first)[0])
    first.train(bench.train_stream[2])
    uninterrupted = _state(memories(first)[0])

    restarted, start = resume(fresh_strategy(cfg), path)
    assert start == 2
    buffer = memories(restarted)[0]
    assert _same(_state(buffer), saved)
    restarted.train(bench.train_stream[start])
    assert _same(_state(memories(restarted)[0]), uninterrupted)

    other = fresh_strategy(
        RunConfig(benchmark="split-digits", buffer="addressing", budget_images=30, **FAST)
    )
    before = dict(other.__dict__)
    with pytest.raises(ValueError, match="another configuration.*budget_bytes"):
        resume(other, path)
    assert other.__dict__ == before


# -- bad input (issue section 5): a clear error, and the buffer unchanged ----------------------


@pytest.mark.parametrize("kind", [PixelBuffer, AddressingBuffer])
def test_budget_too_small_for_one_sample_per_class_is_refused(kind):
    with pytest.raises(ValueError, match="too small"):
        kind(300, SPEC)  # one basis and one address per class need 316 B; ten pixel images 2,580 B


@pytest.fixture
def filled(digits):
    buffer = PixelBuffer(20 * IMAGE, SPEC, num_classes=6, **FAST)
    buffer.add(*_by_class(digits, [0, 1]))
    return buffer


def _refused(buffer, match, *args, **kwargs):
    before, dataset = _state(buffer), buffer.buffer
    with pytest.raises(ValueError, match=match):
        buffer.add(*args, **kwargs)
    assert (
        _same(_state(buffer), before)
        and buffer.buffer is dataset
        and len(buffer.build_seconds) == 1
    )


def test_class_outside_the_output_space_is_refused(filled, digits):
    _refused(
        filled,
        r"classes \[7\] are outside the model's output space \[0, 6\)",
        *_by_class(digits, [2, 7]),
    )


def test_experience_without_data_for_a_class_is_refused(filled, digits):
    _refused(filled, r"holds no samples of \[3\]", *_by_class(digits, [2]), expected=[2, 3])


def test_class_seen_again_is_refused(filled, digits):
    _refused(filled, "already in the memory", *_by_class(digits, [1, 2]))


def test_diverging_distillation_leaves_the_buffer_unchanged(filled, digits):
    from fedcl_dd.distill import DistillationDiverged

    filled.recipe.lr_images = 1e30
    before = _state(filled)
    with pytest.raises(DistillationDiverged):
        filled.add(*_by_class(digits, [2, 3]))
    assert _same(_state(filled), before) and filled.classes == [0, 1]


def test_plugin_refuses_bad_settings():
    buffer = PixelBuffer(20 * IMAGE, SPEC)
    with pytest.raises(ValueError, match="batch_size_mem"):
        MemoryReplayPlugin(buffer, batch_size_mem=0)
    with pytest.raises(TypeError, match="MemoryBuffer"):
        MemoryReplayPlugin(object())


def _digits_stream(digits, task_labels: bool = False, nan_in: int | None = None):
    """SplitDigits built here, optionally with task labels or NaN images in one class."""
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from torch.utils.data import TensorDataset

    x = digits.train_x.clone()
    if nan_in is not None:
        x[torch.nonzero(digits.train_y == nan_in).flatten()[:2]] = float("nan")
    train, test = TensorDataset(x, digits.train_y), TensorDataset(digits.test_x, digits.test_y)
    train.targets, test.targets = digits.train_y.tolist(), digits.test_y.tolist()
    return nc_benchmark(
        train, test, 5, task_labels=task_labels, fixed_class_order=list(range(10)), seed=0
    )


@pytest.mark.parametrize("learner", ["naive", "er-ace"])
@pytest.mark.parametrize(
    "stream_kwargs, match",
    [({"nan_in": 3}, "2 images with NaN or Inf"), ({"task_labels": True}, "task labels \\[1\\]")],
)
def test_a_bad_experience_is_refused_before_any_weight_changes(
    digits, stream_kwargs, match, learner
):
    from fedcl_dd.models import make_model

    bench = _digits_stream(digits, **stream_kwargs)
    buffer = PixelBuffer(20 * IMAGE, SPEC, **FAST)
    model = make_model("mlp", 1, 10, 8, torch.Generator().manual_seed(0))
    cfg = RunConfig(epochs=1, train_mb_size=10, strategy=learner)
    # er-ace replays the buffer itself (MemoryER_ACE), naive through the plugin.
    plugins = [] if learner == "er-ace" else [MemoryReplayPlugin(buffer)]
    strategy = make_strategy(cfg, model, plugins, buffer)
    first, second = bench.train_stream[0], bench.train_stream[1]  # classes 0-1, then 2-3
    strategy.train(first)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held = buffer.classes
    with pytest.raises(ValueError, match=match):
        strategy.train(second)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert buffer.classes == held == [0, 1]


def test_replay_builds_addressing_images_on_demand(digits):
    """The replayed dataset keeps the memory's bases and addresses, not its decoded images,
    and yields the images the memory holds."""
    from fedcl_dd.strategies.avalanche.buffers import _OnDemand

    buffer = AddressingBuffer(40 * IMAGE, SPEC, iterations=0)
    buffer.add(*_by_class(digits, [0, 1, 2]))
    syn = buffer.syn
    assert syn is not None and syn.num_images > 40  # more images than pixel images would fit
    on_demand = _OnDemand(syn)
    held = sum(t.numel() * t.element_size() for t in on_demand.syn.state_tensors().values())
    assert held == buffer.nbytes  # bytes of the memory, not of its decoded images
    images = syn.images().detach()
    for i in (0, 7, syn.num_images - 1):
        x, y, task = buffer.buffer[i]
        assert torch.allclose(x, images[i], atol=1e-5)
        assert y == int(syn.class_ids[i]) and task == 0


CIFAR = SPECS["cifar10"]


def test_slim_resnet18_is_avalanches_own_seeded_and_takes_split_cifar10_input():
    """``slim-resnet18`` is Avalanche's SlimResNet18 for the benchmark's classes, its weights a
    function of the seed alone; the caller's random stream is left as it was."""
    from avalanche.models.slim_resnet18 import ResNet

    cfg = RunConfig(benchmark="split-cifar10", model="slim-resnet18", seed=0)
    rng = torch.get_rng_state()
    model = make_learner(cfg, CIFAR)
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(model, ResNet)
    torch.manual_seed(123)  # another global state: the same weights
    again = make_learner(cfg, CIFAR).state_dict()
    other = make_learner(RunConfig(**{**vars(cfg), "seed": 1}), CIFAR).state_dict()
    weights = model.state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert not torch.equal(weights["conv1.weight"], other["conv1.weight"])
    assert model(torch.randn(2, *CIFAR.image_shape)).shape == (2, CIFAR.num_classes)


@pytest.mark.parametrize("benchmark", ["split-mnist", "split-digits"])
def test_slim_resnet18_refuses_a_benchmark_that_is_not_3x32x32(benchmark):
    """Avalanche's SlimResNet18 views every input as 3x32x32: a 1-channel benchmark fails
    inside its forward, so the configuration refuses it first, naming the fix."""
    with pytest.raises(
        ValueError, match="takes 3-channel 32x32 images.*use benchmark split-cifar10"
    ):
        RunConfig(benchmark=benchmark, model="slim-resnet18")
    with pytest.raises(ValueError, match="unknown model 'resnet-slim'"):
        RunConfig(model="resnet-slim")


def test_herding_refuses_slim_resnet18_which_has_no_flat_embedding_layer():
    from types import SimpleNamespace

    cfg = RunConfig(benchmark="split-cifar10", model="slim-resnet18", buffer="herding")
    bench = SimpleNamespace(spec=CIFAR)  # make_memory reads only the spec
    with pytest.raises(ValueError, match="herding selects in a flat embedding"):
        make_memory(cfg, bench, make_learner(cfg, CIFAR))


def test_slim_resnet18_trains_through_a_split_cifar10_shaped_stream():
    """The whole run (Avalanche's reservoir replay) on 5 experiences of random 3x32x32 images."""
    from avalanche.benchmarks import nc_benchmark
    from fedcl_dd.scenarios.continual import ContinualBenchmark, _LabelledTensors

    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(3)
    data = _LabelledTensors(torch.randn(len(y), *CIFAR.image_shape, generator=g), y)
    order = list(range(10))
    scenario = nc_benchmark(data, data, 5, task_labels=False, seed=0, fixed_class_order=order)
    bench = ContinualBenchmark("split-cifar10", CIFAR, scenario, order)
    cfg = RunConfig(
        benchmark="split-cifar10", model="slim-resnet18", buffer="replay", budget_images=10
    )
    result = run_stream(cfg, bench)
    assert len(result.accuracy_after) == 5 and result.buffer_samples == 10


def test_build_over_train_caps_each_update_at_the_experiences_training_time(streams):
    """A run through Avalanche with the cap: 100,000 iterations asked per update (uncapped, this
    would not finish), every update stops after at least one and far fewer, each build takes
    about as long as its experience's training (slack: one iteration and the initialization),
    and the row records what ran."""
    cfg = RunConfig(
        benchmark="split-digits",
        buffer="pixels",
        budget_images=20,
        epochs=3,
        train_mb_size=10,
        batch_size_mem=10,
        iterations=100_000,
        real_per_class=32,
        build_over_train=1.0,
    )
    result = run_stream(cfg, streams[0])
    assert len(result.iterations_per_update) == 5
    assert all(1 <= n < 100_000 for n in result.iterations_per_update)
    assert result.matching_iterations == min(result.iterations_per_update)
    for build, train in zip(result.build_seconds, result.train_seconds, strict=True):
        assert build <= 1.5 * train + 1.0, (result.build_seconds, result.train_seconds)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_cap_that_is_not_positive_is_refused(bad):
    with pytest.raises(ValueError, match="build_over_train must be > 0"):
        MemoryReplayPlugin(PixelBuffer(20 * IMAGE, SPEC, **FAST), build_over_train=bad)
    with pytest.raises(ValueError, match="build_over_train must be > 0"):
        RunConfig(benchmark="split-digits", buffer="pixels", build_over_train=bad)


def test_a_cap_on_a_baseline_is_refused():
    with pytest.raises(ValueError, match="runs none: leave it unset"):
        RunConfig(benchmark="split-digits", buffer="replay", build_over_train=1.0)


@pytest.fixture
def continual_script(tmp_path, monkeypatch):
    """``benchmarks/continual.py`` as a module, writing its results under ``tmp_path``."""
    from bench_scripts import load_script

    script = load_script("continual")
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    return script


def test_the_benchmark_lists_every_row_a_partial_run_left_out(
    continual_script, tmp_path, monkeypatch
):
    """``benchmarks/continual.py --rows X`` (and ``--resume --rows X``) must not hide the rows
    it did not run: rows_not_run_yet lists every row of the strategy's table still missing, and
    leaves out herding for a learner it cannot select with."""
    import json
    import sys

    script = continual_script
    argv = ["continual.py", "--benchmark", "split-digits", "--seeds", "0", "--strategy", "er-ace"]
    argv += ["--model", "convnet", "--tag", "_t"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rows", "replay"])
    script.main()
    first = json.loads((tmp_path / "continual_split_digits_t.json").read_text())
    assert [r["row"] for r in first["rows"]] == ["replay"]
    waiting = ["class-balanced", "addressing", "pixels", "multi", "compressed-real"]
    assert first["rows_not_run_yet"] == waiting  # no herding: the convnet has no flat embedding
    monkeypatch.setattr(sys, "argv", [*argv, "--resume", "--rows", "class-balanced"])
    script.main()
    second = json.loads((tmp_path / "continual_split_digits_t.json").read_text())
    assert [r["row"] for r in second["rows"]] == ["replay", "class-balanced"]
    assert second["rows_not_run_yet"] == waiting[1:]


def test_a_stopped_benchmark_resumes_seed_by_seed(continual_script, tmp_path, monkeypatch):
    """A row stopped after its first seed keeps that seed in the JSON; --resume runs only the
    others and ends with the row an uninterrupted run gives."""
    import json
    import sys

    script = continual_script
    real_run, ran = script.run_stream, []

    def stopping(cfg, bench, **kwargs):
        if cfg.seed == 1 and "stopped" not in ran:
            ran.append("stopped")
            raise KeyboardInterrupt  # the session ends part-way through the row
        ran.append(cfg.seed)
        return real_run(cfg, bench, **kwargs)

    monkeypatch.setattr(script, "run_stream", stopping)
    argv = ["continual.py", "--benchmark", "split-digits", "--seeds", "0", "1", "--rows", "replay"]
    monkeypatch.setattr(sys, "argv", [*argv, "--tag", "_stop"])
    with pytest.raises(KeyboardInterrupt):
        script.main()
    stopped = json.loads((tmp_path / "continual_split_digits_stop.json").read_text())
    assert stopped["rows"] == [] and list(stopped["partial"]["replay"]["seeds"]) == ["0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--tag", "_stop", "--resume"])
    script.main()
    assert ran == [0, "stopped", 1]  # seed 0 was not run again
    resumed = json.loads((tmp_path / "continual_split_digits_stop.json").read_text())
    assert resumed["partial"] == {} and resumed["rows"][0]["seeds_resumed"] == [0]
    monkeypatch.setattr(script, "run_stream", real_run)
    monkeypatch.setattr(sys, "argv", [*argv, "--tag", "_whole"])
    script.main()
    whole = json.loads((tmp_path / "continual_split_digits_whole.json").read_text())
    for key in ("final_accuracies", "accuracy_after", "forgetting", "distinct_samples"):
        assert resumed["rows"][0][key] == whole["rows"][0][key]
