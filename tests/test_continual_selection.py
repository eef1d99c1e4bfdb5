"""Continual settings are chosen on validation data carved from the training stream, never on test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("avalanche")

from fedcl_dd.scenarios import continual as scenarios
from fedcl_dd.strategies.avalanche.runner import RunConfig
from fedcl_dd.strategies.avalanche.selection import choose

from fedcl_dd.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = RunConfig(benchmark="split-digits", buffer="replay", budget_images=20, train_mb_size=10)
GRID = [{"batch_size_mem": 4}, {"batch_size_mem": 32, "lr": 0.05}]


def _validation_choice(monkeypatch: pytest.MonkeyPatch, permute_test: bool):
    digits = load_dataset("digits")
    if permute_test:
        shuffled = digits.test_y[
            torch.randperm(len(digits.test_y), generator=torch.Generator().manual_seed(1))
        ]
        assert not torch.equal(shuffled, digits.test_y)
        digits = dataclasses.replace(digits, test_y=shuffled)
    monkeypatch.setattr(scenarios, "load_dataset", lambda name, root=None: digits)
    bench = scenarios.with_validation(scenarios.make_benchmark("split-digits", seed=0), 0.2, seed=0)
    return choose(BASE, GRID, bench)


def test_shuffling_the_test_labels_changes_no_choice(monkeypatch):
    honest = _validation_choice(monkeypatch, permute_test=False)
    shuffled = _validation_choice(monkeypatch, permute_test=True)
    assert shuffled.scores == honest.scores  # the selection never read a test label
    assert shuffled.best == honest.best
    # The two settings differ on validation, so the choice is not a tie broken by order.
    assert honest.scores[0] != honest.scores[1]


def test_validation_is_held_out_of_every_experience():
    bench = scenarios.make_benchmark("split-digits", seed=0)
    val = scenarios.with_validation(bench, 0.2, seed=0)
    for full, train, held in zip(
        bench.train_stream, val.train_stream, val.eval_stream, strict=True
    ):
        assert len(train.dataset) + len(held.dataset) == len(full.dataset)
        assert set(held.dataset.targets) == set(full.classes_in_this_experience)
    assert val.eval_stream_name == "valid"


def test_choosing_on_a_test_scored_benchmark_is_refused():
    bench = scenarios.make_benchmark("split-digits", seed=0)
    with pytest.raises(ValueError, match="validation stream.*with_validation"):
        choose(BASE, GRID, bench)
    with pytest.raises(ValueError, match="fraction"):
        scenarios.with_validation(bench, 1.0)
