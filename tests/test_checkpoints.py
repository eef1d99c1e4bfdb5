"""Checkpoints are verified before anything in them is used: a checksum, then a schema check.
A corrupted, truncated or crafted file is refused in one line that names the path."""

from __future__ import annotations

import pytest
import torch
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.payload import model_arrays
from fedcl_dd.strategies.flower.strategy import RoundReport, SyntheticSetStrategy

from fedcl_dd.io import CorruptCheckpoint, load_checkpoint, save_checkpoint
from fedcl_dd.models import make_model

CFG = FedConfig(preset="digits-iid-4", ipc=5, server_epochs=1)


def test_damaged_files_are_refused_in_one_line(tmp_path):
    path = save_checkpoint({"round": 1, "x": torch.ones(3)}, tmp_path / "c.pt")
    good = path.read_bytes()
    assert load_checkpoint(path)["round"] == 1
    raw = tmp_path / "raw.pt"
    torch.save({"round": 1}, raw)  # a plain torch file, no header
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    cases = {
        "truncated": good[: len(good) // 2],
        "flipped": bytes(flipped),
        "garbage": b"\x00garbage" * 10,
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptCheckpoint) as err:
            load_checkpoint(tmp_path / name)
        message = str(err.value)
        assert str(tmp_path / name) in message and "\n" not in message
        assert "weights_only" not in message  # never a hint to unpickle arbitrary code
    with pytest.raises(CorruptCheckpoint, match="no header"):
        load_checkpoint(raw)


def _saved_run(tmp_path) -> SyntheticSetStrategy:
    strategy = SyntheticSetStrategy(CFG, checkpoint=tmp_path / "ckpt.pt")
    spec = strategy.spec
    net = make_model(CFG.model, spec.channels, spec.num_classes, spec.image_size)
    strategy._global = model_arrays(net)
    strategy.reports = [RoundReport(round=1)]
    strategy.save_checkpoint()
    return strategy


@pytest.mark.parametrize(
    "craft, match",
    [
        (lambda s: s.update(round=-5), "round -5"),
        (lambda s: s.update(round=99), "round 99"),
        (lambda s: s["model"].update({next(iter(s["model"])): torch.full((1,), 1.0)}), "shape"),
        (lambda s: next(iter(s["model"].values())).fill_(float("nan")), "NaN"),
        (lambda s: s["model"].pop(next(iter(s["model"]))), "not those of the run's model"),
        (lambda s: s.pop("pool"), "KeyError"),
        (lambda s: s.update(initial_evaluation={"accuracy": "high"}), "ValueError"),
    ],
)
def test_a_crafted_server_checkpoint_is_refused_and_changes_nothing(tmp_path, craft, match):
    _saved_run(tmp_path)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    craft(state)
    save_checkpoint(state, tmp_path / "ckpt.pt")  # a valid checksum over crafted content
    fresh = SyntheticSetStrategy(CFG, checkpoint=tmp_path / "ckpt.pt")
    with pytest.raises(CorruptCheckpoint, match=match):
        fresh.resume()
    assert fresh.round_offset == 0 and fresh.reports == [] and fresh._global is None


def test_a_sound_server_checkpoint_resumes(tmp_path):
    saved = _saved_run(tmp_path)
    saved.record_evaluation(0, {"accuracy": 0.125})  # the initial model's, before round 1
    saved.save_checkpoint()
    fresh = SyntheticSetStrategy(CFG, checkpoint=tmp_path / "ckpt.pt")
    arrays, done = fresh.resume()
    assert done == 1 and set(arrays) == set(saved._global)
    assert fresh.initial_evaluation == {"accuracy": 0.125}  # a resumed run still has round 0
