"""A real Flower simulation (Ray backend): honest and faulty clients in one run.

Six simulated clients on ``digits-iid-6``: 0 and 1 are honest; 2 uploads NaN pixels,
3 a label outside the label space, 4 twice its image budget, 5 crashes. In round 2 every
client crashes. The strategy must accept the honest uploads, refuse or count the rest with
a reason, keep going, and keep the previous model when nothing valid arrives.
"""

from __future__ import annotations

import sys

import cloudpickle
import pytest
import torch
from fedcl_dd.strategies.flower import client_app as honest
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.payload import SYNTHETIC
from fedcl_dd.strategies.flower.simulation import simulate
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

# One xdist worker runs every Ray/Flower-process test, one after the other (see conftest.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.xdist_group("flower"),
]

# Ray workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

faulty = ClientApp()


def _corrupt(content, pid: int) -> None:
    arrays = content[SYNTHETIC]
    images = torch.from_numpy(arrays["images"].numpy().copy())
    labels_key = next(k for k in arrays if k != "images")
    labels = torch.from_numpy(arrays[labels_key].numpy().copy())
    if pid == 2:
        images[0, 0, 0, 0] = float("nan")
    elif pid == 3:
        labels[0] = 99
    elif pid == 4:
        images, labels = torch.cat([images, images]), torch.cat([labels, labels])
    arrays["images"] = Array.from_numpy_ndarray(images.numpy())
    arrays[labels_key] = Array.from_numpy_ndarray(labels.numpy())


@faulty.train()
def _train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    if int(msg.content["config"]["server-round"]) == 2 or pid == 5:
        raise RuntimeError(f"simulated crash of client {pid}")
    reply = honest.train(msg, context)
    if pid in (2, 3, 4):
        _corrupt(reply.content, pid)
    return reply


@faulty.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)


def test_faulty_clients_are_refused_and_rounds_go_on(tmp_path):
    cfg = FedConfig(
        preset="digits-iid-6",
        rounds=2,
        ipc=5,
        iterations=10,
        server_epochs=30,
        options={"real_per_class": 32},
    )
    results = simulate(cfg, tmp_path, device=torch.device("cpu"), client_app=faulty)
    rounds = {row["round"]: row for row in results["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    first = rounds[1]
    assert first["accepted"] == [0, 1]
    reasons = " | ".join(item["reason"] for item in first["rejected"])
    assert len(first["rejected"]) == 3
    assert (
        "NaN" in reasons and "outside [0, 10)" in reasons and "exceed the limit of 50" in reasons
    ), reasons
    assert (
        len(first["failed"]) == 1 and "simulated crash of client 5" in first["failed"][0]["reason"]
    )
    assert first["upload_bytes"] == 2 * 5 * 10 * (
        8 * 8 * 4 + 2
    )  # two honest pixel sets, int16 labels
    assert first["accuracy"] > rounds[0]["accuracy"] + 0.3, (
        "training on the honest uploads did not help"
    )
    # Validation: the clients' held-out shares of their training data (what settings are
    # chosen on), beside the test accuracy.
    assert 0.3 < first["validation_accuracy"] <= 1.0
    last = rounds[2]
    assert last["kept_previous_model"] and len(last["failed"]) == 6 and not last["accepted"]
    assert last["accuracy"] == first["accuracy"], "a round with no valid upload changed the model"
    assert last["upload_bytes_total"] == first["upload_bytes"]
    # Downloads: the global model went to all six nodes in both rounds.
    from fedcl_dd.strategies.flower.strategy import initial_model

    model_bytes = sum(
        t.numel() * t.element_size() for t in initial_model(cfg).state_dict().values()
    )
    assert 6 * model_bytes < first["download_bytes"] < 6 * model_bytes * 1.1
    assert last["download_bytes"] == first["download_bytes"]
    assert 0 < first["client_seconds_max"] <= first["client_seconds_sum"]
    for name in (
        "results.json",
        "accuracy.png",
        "partitions.png",
        "upload-client0.png",
        "checkpoint.pt",
    ):
        assert (tmp_path / name).is_file(), name


def test_fedavgm_is_metered_as_ours_and_resumes_where_it_stopped(tmp_path):
    """Flower's own FedAvgM (FedAvg and FedProx are its subset: no server state): bytes up
    and down, client and server seconds, per round. It checkpoints after every round, its
    server momentum included: 1 round, then resumed to 2, ends as an uninterrupted 2-round
    run does (same test and validation accuracy every round); resuming with other settings
    or from an altered checkpoint is refused."""
    from fedcl_dd.strategies.flower.server_app import CHECKPOINT, resume_baseline
    from fedcl_dd.strategies.flower.strategy import CheckpointMismatch, initial_model

    from fedcl_dd.io import CorruptCheckpoint

    cfg = FedConfig(preset="digits-iid-2", algorithm="fedavgm", rounds=2)
    cpu = torch.device("cpu")
    whole = simulate(cfg, tmp_path / "whole", device=cpu)
    rounds = {row["round"]: row for row in whole["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    model_bytes = sum(
        t.numel() * t.element_size() for t in initial_model(cfg).state_dict().values()
    )
    for r in (1, 2):
        row = rounds[r]
        assert row["accepted"] == 2
        # Each node got the global model and its config, and sent back a model.
        assert 2 * model_bytes < row["download_bytes"] < 2 * model_bytes * 1.1, row
        assert 2 * model_bytes <= row["upload_bytes"] < 2 * model_bytes * 1.1, row
        assert 0 < row["client_seconds_max"] <= row["client_seconds_sum"], row
        assert row["server_seconds"] > 0, row
    assert rounds[2]["upload_bytes_total"] == rounds[1]["upload_bytes"] + rounds[2]["upload_bytes"]

    simulate(cfg.replace(rounds=1), tmp_path / "split", device=cpu)
    resumed = simulate(cfg, tmp_path / "split", resume=True, device=cpu)
    assert resumed["resumed_after"] == 1
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in whole["rounds"]]
    # The validation of the round before the restart came back with the checkpoint.
    validation = [r["validation_accuracy"] for r in resumed["rounds"][1:]]
    assert validation == [r["validation_accuracy"] for r in whole["rounds"][1:]]
    assert all(0.0 < v <= 1.0 for v in validation), validation
    assert [r["upload_bytes_total"] for r in resumed["rounds"]] == [
        r["upload_bytes_total"] for r in whole["rounds"]
    ]

    checkpoint = tmp_path / "split" / CHECKPOINT
    *_, momentum = resume_baseline(cfg, checkpoint)
    assert momentum and all(torch.isfinite(m).all() for m in momentum.values())
    with pytest.raises(CheckpointMismatch, match="local-lr: 0.01 vs 0.05"):
        resume_baseline(cfg.replace(local_lr=0.05), checkpoint)
    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="altered"):
        resume_baseline(cfg, checkpoint)
