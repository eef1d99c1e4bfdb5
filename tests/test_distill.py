"""The shared distillation loop: resumable, safe against divergence, observable."""

import pytest
import torch
from dm_start import dm_start

from fedcl_dd.distill import (
    Callback,
    Checkpointer,
    DistillationDiverged,
    DistillConfig,
    PeriodicEvaluation,
    distill,
)
from fedcl_dd.io import load_checkpoint
from fedcl_dd.objectives import DistributionMatching


def test_resume_continues_exactly_where_the_run_stopped(digits, digits_sampler, tmp_path):
    ctx, syn = dm_start(digits, digits_sampler)
    straight = distill(syn, DistributionMatching(32), ctx, DistillConfig(iterations=6))

    ctx2, syn2 = dm_start(digits, digits_sampler)
    ckpt = tmp_path / "ckpt.pt"
    distill(
        syn2, DistributionMatching(32), ctx2, DistillConfig(iterations=3), [Checkpointer(ckpt, 1)]
    )
    ctx3, syn3 = dm_start(
        digits, digits_sampler, seed=99
    )  # fresh objects, other seeds: state comes from the file
    resumed = distill(
        syn3,
        DistributionMatching(32),
        ctx3,
        DistillConfig(iterations=6),
        [Checkpointer(ckpt, 0, resume=True)],
    )

    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    assert torch.allclose(syn3.images(), syn.images(), atol=1e-6)


def test_divergence_names_the_iteration_and_restores_the_set(digits, digits_sampler, tmp_path):
    ctx, syn = dm_start(digits, digits_sampler)
    ckpt = tmp_path / "ckpt.pt"
    distill(
        syn, DistributionMatching(16), ctx, DistillConfig(iterations=2), [Checkpointer(ckpt, 1)]
    )
    saved = ckpt.read_bytes()
    before = syn.images().detach().clone()

    class PoisonAfter(DistributionMatching):
        calls = 0

        def loss(self, ctx, net, syn):
            PoisonAfter.calls += 1
            out = super().loss(ctx, net, syn)
            return out * float("inf") if PoisonAfter.calls == 2 else out

    with pytest.raises(DistillationDiverged, match="iteration 4.*smaller learning rate"):
        distill(
            syn,
            PoisonAfter(16),
            ctx,
            DistillConfig(iterations=5),
            [Checkpointer(ckpt, 1, resume=True)],
        )
    assert torch.isfinite(syn.images()).all()
    assert not torch.equal(syn.images(), before)  # iteration 3 ran and was kept
    assert ckpt.read_bytes() != saved  # checkpoint of iteration 3 written ...
    assert load_checkpoint(ckpt)["iteration"] == 3  # ... and nothing after the failure


def test_huge_learning_rate_diverges_cleanly(digits, digits_sampler):
    ctx, syn = dm_start(digits, digits_sampler)
    with pytest.raises(DistillationDiverged, match="Try a smaller learning rate"):
        distill(syn, DistributionMatching(16), ctx, DistillConfig(iterations=5, lr_images=1e38))
    assert torch.isfinite(syn.images()).all()


def test_callbacks_see_every_iteration_and_periodic_evaluation_logs(digits, digits_sampler):
    ctx, syn = dm_start(digits, digits_sampler)
    seen = []

    class Record(Callback):
        def on_iteration(self, state):
            seen.append((state.iteration, state.loss))

    evals = PeriodicEvaluation(2, lambda s: {"n": float(s.num_images)})
    result = distill(
        syn, DistributionMatching(16), ctx, DistillConfig(iterations=5), [Record(), evals]
    )
    assert [it for it, _ in seen] == [1, 2, 3, 4, 5]
    assert result.metrics["n"] == [(2, 20.0), (4, 20.0), (5, 20.0)]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="lr_images must be > 0"):
        DistillConfig(lr_images=0)
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        DistillConfig(iterations=-1)


def test_resuming_from_a_missing_checkpoint_names_the_file(digits, digits_sampler, tmp_path):
    ctx, syn = dm_start(digits, digits_sampler)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.pt"):
        distill(
            syn,
            DistributionMatching(16),
            ctx,
            DistillConfig(iterations=2),
            [Checkpointer(tmp_path / "missing.pt", 1, resume=True)],
        )


def test_every_callback_is_prepared_before_any_starts(digits, digits_sampler, tmp_path):
    """A restored checkpoint is seen by the callbacks that start after it (e.g. a progress bar's start)."""
    ctx, syn = dm_start(digits, digits_sampler)
    ckpt = tmp_path / "ckpt.pt"
    distill(
        syn, DistributionMatching(16), ctx, DistillConfig(iterations=2), [Checkpointer(ckpt, 1)]
    )
    started = []

    class Start(Callback):
        def on_start(self, state, total):
            started.append(state.iteration)

    distill(
        syn,
        DistributionMatching(16),
        ctx,
        DistillConfig(iterations=3),
        [Start(), Checkpointer(ckpt, 1, resume=True)],
    )
    assert started == [2]


def test_a_long_run_says_how_long_it_will_take(digits, digits_sampler, capsys, monkeypatch):
    """After its first iterations, a run expected to last over a minute prints the estimate."""
    import itertools

    import fedcl_dd.distill as loop
    from fedcl_dd.distill import ProgressBar, TimeLimit

    ctx, syn = dm_start(digits, digits_sampler)
    clock = itertools.count(0.0, 1000.0)  # each reading 1000 s after the last: a slow machine
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    distill(
        syn, DistributionMatching(16), ctx, DistillConfig(iterations=8), [ProgressBar(disable=True)]
    )
    err = capsys.readouterr().err
    assert "more minutes for the remaining 2 iterations" in err  # timed: iterations 2 to 6

    # Under a time limit that ends the run first, the estimate is the limit's, not the count's.
    ctx, syn = dm_start(digits, digits_sampler)
    clock = itertools.count(0.0, 1000.0)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    bar = ProgressBar(disable=True)
    distill(
        syn, DistributionMatching(16), ctx, DistillConfig(iterations=800), [bar, TimeLimit(2e4)]
    )
    # 7000 s of the 20000 are spent: 13000 s (~11 iterations) are left, not 794 iterations.
    assert "1200.00 s per iteration, about 216.7 more minutes for the remaining 11 iterations" in (
        capsys.readouterr().err
    )


def test_the_estimate_leaves_out_the_first_iteration(capsys, monkeypatch):
    """A first iteration that compiles for ten minutes does not make the estimate ten minutes
    per iteration."""
    from types import SimpleNamespace

    import fedcl_dd.distill as loop
    from fedcl_dd.distill import ProgressBar

    now = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    bar = ProgressBar(disable=True)
    state = SimpleNamespace(
        iteration=0, time_limit=None, seconds=0.0, loss=1.0, objective=SimpleNamespace(report=dict)
    )
    bar.on_start(state, 100)
    for i, seconds in enumerate([600.0] + [10.0] * 6, start=1):
        now[0] += seconds
        state.iteration = i
        bar.on_iteration(state)
    err = capsys.readouterr().err
    assert "10.00 s per iteration, about 15.7 more minutes for the remaining 94 iterations" in err


def test_a_long_evaluation_says_its_expected_time_and_trains_as_a_quiet_one(
    digits, capsys, monkeypatch
):
    """An evaluation with progress times its epochs after the first and says how long the
    rest takes; the networks it trains are those of an evaluation without progress."""
    import itertools

    import fedcl_dd.progress as progress
    from fedcl_dd.evaluate import evaluate

    x, y = digits.train_x[:40], digits.train_y[:40]
    test_x, test_y = digits.test_x[:200], digits.test_y[:200]
    quiet = evaluate((x, y), test_x, test_y, digits.spec, num_models=2, epochs=8)
    assert "more minutes" not in capsys.readouterr().err
    clock = itertools.count(0.0, 1000.0)  # each reading 1000 s after the last
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    shown = evaluate(
        (x, y), test_x, test_y, digits.spec, num_models=2, epochs=8, progress=True, bar=False
    )
    # Read after epochs 1 and 6: 1000 s for 5 epochs; 10 of the 2 x 8 are left.
    assert (
        "evaluate convnet: 200.00 s per epoch, about 33.3 more minutes for the remaining 10 "
        "epochs" in capsys.readouterr().err
    )
    assert shown.accuracies == quiet.accuracies


def test_a_step_bar_leaves_out_the_first_step(capsys, monkeypatch):
    """A first epoch that compiles for ten minutes does not make the estimate ten minutes per
    epoch."""
    import fedcl_dd.progress as progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    steps = progress.StepBar(100, "evaluate", "epoch", disable=True)
    for seconds in [600.0] + [10.0] * 6:
        now[0] += seconds
        steps.step()
    assert "10.00 s per epoch, about 15.7 more minutes for the remaining 94 epochs" in (
        capsys.readouterr().err
    )


def test_a_short_run_prints_no_estimate(digits, digits_sampler, capsys):
    from fedcl_dd.distill import ProgressBar

    ctx, syn = dm_start(digits, digits_sampler)
    distill(
        syn, DistributionMatching(16), ctx, DistillConfig(iterations=8), [ProgressBar(disable=True)]
    )
    assert "more minutes" not in capsys.readouterr().err
