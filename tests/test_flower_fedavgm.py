"""Flower's FedAvgM as a baseline: its settings are checked, its momentum goes into the
baseline's checkpoint and comes back checked, and checkpoints written before a setting
existed still resume (the run through Ray is in test_flower_simulation.py)."""

from __future__ import annotations

import math

import pytest
import torch
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.server_app import (
    CHECKPOINT,
    MeteredFedAvgM,
    build_run,
    resume_baseline,
    save_baseline_checkpoint,
)
from fedcl_dd.strategies.flower.strategy import CheckpointMismatch, check_same_config
from hypothesis import given
from hypothesis import strategies as st

from fedcl_dd.io import CorruptCheckpoint

CFG = FedConfig(preset="digits-iid-2", algorithm="fedavgm", rounds=2)


@given(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(math.nan)))
def test_a_server_momentum_outside_zero_to_one_is_refused_by_name(momentum: float):
    with pytest.raises(ValueError, match=r"server-momentum must lie in \[0, 1\)"):
        FedConfig(algorithm="fedavgm", server_momentum=momentum)


@given(st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan)))
def test_a_server_update_lr_that_is_not_a_positive_number_is_refused_by_name(lr: float):
    with pytest.raises(ValueError, match="server-update-lr must be a finite number > 0"):
        FedConfig(algorithm="fedavgm", server_update_lr=lr)


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default():
    saved = CFG.to_dict()
    del saved["server-momentum"], saved["server-update-lr"]  # as written before FedAvgM
    check_same_config(None, saved, CFG)  # the defaults: what those runs did
    with pytest.raises(CheckpointMismatch, match="server-momentum: None vs 0.5"):
        check_same_config(None, saved, CFG.replace(server_momentum=0.5))


def _run_with_momentum(tmp_path, momentum: dict[str, torch.Tensor]):
    """A FedAvgM run as round 1 leaves it: the global model, one round of history and
    ``momentum`` in the strategy, checkpointed."""
    run = build_run(CFG, tmp_path, device=torch.device("cpu"))
    assert isinstance(run.strategy, MeteredFedAvgM)
    run.strategy.current_arrays = run.initial_arrays
    run.strategy.momentum_vector = [t.numpy() for t in momentum.values()]
    run.history = {1: {"accuracy": 0.5, "validation": None, "train": None, "sent": None}}
    save_baseline_checkpoint(run, run.initial_arrays, 1)
    return run


def test_fedavgm_momentum_is_checkpointed_and_restored(tmp_path):
    model = build_run(CFG, tmp_path / "probe", device=torch.device("cpu")).evaluator
    gen = torch.Generator().manual_seed(0)
    momentum = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    _run_with_momentum(tmp_path, momentum)

    resumed = build_run(CFG, tmp_path, resume=True, device=torch.device("cpu"))
    assert resumed.done == 1 and isinstance(resumed.strategy, MeteredFedAvgM)
    restored = resumed.strategy.momentum_vector
    assert restored is not None and len(restored) == len(momentum)
    for got, want in zip(restored, momentum.values(), strict=True):
        assert torch.equal(torch.from_numpy(got), want)


@pytest.mark.parametrize("fault", ["shape", "nan"])
def test_a_checkpoint_whose_momentum_does_not_fit_the_model_is_refused(tmp_path, fault: str):
    model = build_run(CFG, tmp_path / "probe", device=torch.device("cpu")).evaluator
    momentum = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    first = next(iter(momentum))
    if fault == "shape":
        momentum[first] = torch.zeros(3)
    else:
        momentum[first][(0,) * momentum[first].dim()] = math.nan
    _run_with_momentum(tmp_path, momentum)
    with pytest.raises(CorruptCheckpoint, match=f"{first}.*(wrong shape|NaN)"):
        resume_baseline(CFG, tmp_path / CHECKPOINT)
