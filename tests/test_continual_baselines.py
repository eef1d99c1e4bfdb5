"""Baselines at equal bytes (issue 13, item 4): Avalanche's ER-ACE and DER, and compressed real images.

Every run is SplitDigits at the bytes of 20 labelled 8x8 images (258 B each), 3 epochs per
experience, 10 new samples per minibatch and the runner's default memory batch (128, more
than any of these memories holds). Runs are shared by the module's tests.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("avalanche")

from fedcl_dd.strategies.avalanche.buffers import CompressedRealBuffer
from fedcl_dd.strategies.avalanche.checkpoint import memories
from fedcl_dd.strategies.avalanche.runner import RunConfig, run_stream, sample_bytes

from fedcl_dd.cli import main
from fedcl_dd.data import SPECS
from fedcl_dd.synthetic import bytes_per_image

# One worker runs the module, so that its `runs` fixture is built once (xdist: once per worker).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("continual-baselines")]

SPEC = SPECS["digits"]
IMAGE = bytes_per_image(SPEC.image_shape)  # 258 bytes
BUDGET = 20 * IMAGE
COMMON = dict(benchmark="split-digits", budget_images=20, epochs=3, train_mb_size=10)
RUNS = {
    "replay": {},
    "er-ace": {},
    "der": {},
    "compressed-real": {},  # factor 2, fp32: 4 sub-images at 4x4 per stored image
    "compressed-real-fp16": dict(buffer="compressed-real", factor=1, storage="fp16"),
    # ER-ACE's loss over a storage policy of our choosing: Avalanche's own buffer (which must
    # reproduce ER_ACE exactly) and our pixel memory.
    "er-ace/class-balanced": dict(buffer="class-balanced", strategy="er-ace"),
    "er-ace/pixels": dict(buffer="pixels", strategy="er-ace", iterations=3, real_per_class=32),
}


@pytest.fixture(scope="module")
def runs():
    """Each configuration's result, the stored tensors of our memories at the end, and the
    messages of the warnings the run raised."""
    from fedcl_dd.scenarios.continual import make_benchmark

    bench = make_benchmark("split-digits", seed=0)
    out = {}
    for name, extra in RUNS.items():
        stored: dict[str, torch.Tensor] = {}

        def keep(i, result, strategy, stored=stored):
            memory = memories(strategy)[0]
            if isinstance(memory, CompressedRealBuffer):
                stored.update(memory.syn.state_tensors())

        cfg = RunConfig(**{"buffer": name, **COMMON, **extra})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_stream(cfg, bench, on_experience=keep)
        out[name] = (result, stored, [str(w.message) for w in caught])
    return out


@pytest.mark.parametrize("name", ["er-ace", "der", "compressed-real", "compressed-real-fp16"])
def test_each_baseline_replays_the_whole_stream_within_the_budget(runs, name):
    result, _, _ = runs[name]
    assert len(result.accuracy_after) == 5
    assert 0 < result.buffer_bytes <= BUDGET
    # Without replay the stream ends near 0.2 (the last two classes); ER-ACE and DER replay
    # only because their memory batch is capped at their memory's size.
    assert result.final_accuracy > 0.5, result.accuracy_after
    assert result.matching_iterations == 0


def test_der_counts_its_logits_and_holds_fewer_samples_than_replay(runs):
    der, replay = runs["der"][0], runs["replay"][0]
    per_sample = sample_bytes(SPEC.image_shape, SPEC.num_classes)
    assert per_sample == IMAGE + 10 * 4  # the image, its label and 10 fp32 logits
    assert der.buffer_samples == BUDGET // per_sample == 17
    assert der.buffer_bytes == der.buffer_samples * per_sample
    assert replay.buffer_samples == 20 and der.buffer_samples < replay.buffer_samples


def test_er_ace_holds_as_many_real_samples_as_replay(runs):
    er_ace = runs["er-ace"][0]
    assert er_ace.buffer_samples == er_ace.distinct_samples == 20
    assert er_ace.buffer_bytes == 20 * IMAGE


def test_compressed_real_holds_more_distinct_samples_than_replay_in_its_stored_bytes(runs):
    replay = runs["replay"][0]
    for name, (sub_images, dtype) in {
        "compressed-real": (4, torch.float32),
        "compressed-real-fp16": (1, torch.float16),
    }.items():
        result, stored, _ = runs[name]
        assert stored["images"].dtype == dtype
        # The bytes reported are those of the tensors stored, labels included.
        assert result.buffer_bytes == sum(t.numel() * t.element_size() for t in stored.values())
        assert result.buffer_samples == stored["images"].shape[0] * sub_images
        assert result.distinct_samples > replay.distinct_samples, name
    # fp16 at full resolution: 20 fp32 images' bytes hold 30 half-precision ones (5 per class
    # would not fit: 10 classes x 5 x 130 B = 6,500 B > 5,160 B).
    assert runs["compressed-real-fp16"][0].buffer_samples == 30
    assert runs["compressed-real"][0].distinct_samples == 80


def test_er_ace_over_its_own_buffer_kind_reproduces_avalanches_er_ace(runs):
    """MemoryER_ACE keeps ER_ACE's loop and loss: over the class-balanced buffer ER_ACE builds
    itself, every accuracy is the same number."""
    ours, theirs = runs["er-ace/class-balanced"][0], runs["er-ace"][0]
    assert ours.accuracy_after == theirs.accuracy_after
    assert ours.buffer_samples == theirs.buffer_samples == 20


def test_er_ace_replays_our_distilled_memory_within_the_budget(runs):
    result, none = runs["er-ace/pixels"][0], runs["replay"][0]
    assert result.matching_iterations == 3 and 0 < result.buffer_bytes <= BUDGET
    assert result.buffer_samples == 20  # 2 per class after the last experience
    # Trained on the replayed memory: far above the last experience's two classes alone.
    assert result.final_accuracy > 0.5, result.accuracy_after
    assert result.accuracy_after != none.accuracy_after


def test_er_ace_over_our_memory_raises_no_deprecation_warning_of_avalanches_making(runs):
    """Avalanche's ER_ACE calls its storage policy's deprecated ``update`` every experience:
    over Avalanche's buffers that warns, over our memories it does not."""
    deprecated = "Call to deprecated function update"
    assert any(deprecated in m for m in runs["er-ace/class-balanced"][2])
    assert not any(deprecated in m for m in runs["er-ace/pixels"][2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(buffer="gdumb"), "gdumb trains a fresh model"),
        (dict(buffer="pixels", fresh=True), "fresh-model protocol"),
        (dict(buffer="pixels", build_over_train=1.0), "builds the memory before training"),
    ],
)
def test_er_ace_refuses_a_memory_it_cannot_replay(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(benchmark="split-digits", strategy="er-ace", **kwargs)


@pytest.mark.parametrize("buffer", ["er-ace", "der"])
def test_ewc_with_a_strategy_buffer_is_refused(buffer):
    with pytest.raises(ValueError, match="Avalanche's own strategy.*use strategy 'naive'"):
        RunConfig(benchmark="split-digits", buffer=buffer, strategy="ewc")


def test_compressed_real_refuses_matching_iterations():
    with pytest.raises(ValueError, match="no matching iteration.*'multi'"):
        RunConfig(benchmark="split-digits", buffer="compressed-real", iterations=5)
    with pytest.raises(ValueError, match="no matching iteration"):
        CompressedRealBuffer(BUDGET, SPEC, iterations=5)


def test_command_line_sets_factor_and_storage_and_refuses_ewc_with_der(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["continual", "--benchmark", "split-digits", "--budget-images", "20", "--no-progress"]
    args = ["--buffer", "compressed-real", "--factor", "1", "--storage", "fp16", "--out", str(out)]
    assert main([*base, *args, "--train-mb-size", "10"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["factor"] == 1 and result["buffer_samples"] == 30
    assert result["buffer_bytes"] == 30 * (64 * 2 + 2)
    assert main([*base, "--buffer", "der", "--strategy", "ewc"]) == 2
    assert "use strategy 'naive'" in capsys.readouterr().err


def test_der_checkpoint_resumes_and_one_of_another_budget_is_refused(tmp_path):
    """DER keeps its buffer on the strategy, not in a plugin: the checkpoint check must see it."""
    from fedcl_dd.scenarios.continual import make_benchmark

    bench, path = make_benchmark("split-digits", seed=0), tmp_path / "der.pkl"
    cfg = RunConfig(**{**COMMON, "buffer": "der", "epochs": 1})
    first = run_stream(cfg, bench, checkpoint=path)
    assert run_stream(cfg, bench, checkpoint=path).accuracy_after == first.accuracy_after
    other = RunConfig(**{**COMMON, "buffer": "der", "epochs": 1, "budget_images": 30})
    with pytest.raises(ValueError, match="another configuration.*max_size"):
        run_stream(other, bench, checkpoint=path)
