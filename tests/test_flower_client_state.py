"""A client's ledger and warm-start set survive restarts: written before the reply leaves,
read back by a client that lost its ``context.state``, and a spent budget stays spent."""

from __future__ import annotations

import json

import pytest
import torch
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.payload import METRICS, SYNTHETIC
from flower_messages import train_in_process
from flwr.app import Message

from fedcl_dd.privacy import PrivacyBudgetError

CFG = FedConfig(
    preset="digits-iid-4",
    method="dm-dp",
    epsilon=8.0,
    rounds=2,
    ipc=2,
    iterations=3,
    options={"real_per_class": 16},
)


def _train(server_round: int, node_config: dict) -> Message:
    """One train message to partition 1, handled by a client with a fresh (restarted) context."""
    return train_in_process(CFG, server_round, node_config)


def test_a_restarted_client_continues_its_ledger_and_refuses_to_overspend(tmp_path):
    node = {"partition-id": 1, "num-partitions": 4, "state-dir": str(tmp_path)}
    first = _train(1, node)
    assert not first.has_error(), first.error
    ledger = json.loads((tmp_path / "partition-1" / "ledger.json").read_text())
    assert sum(ledger["steps"]) == CFG.iterations
    assert (tmp_path / "partition-1" / "synthetic-round1.safetensors").is_file()  # warm start

    second = _train(2, node)  # a new process: context.state is empty, the files are not
    assert not second.has_error(), second.error
    ledger = json.loads((tmp_path / "partition-1" / "ledger.json").read_text())
    assert sum(ledger["steps"]) == 2 * CFG.iterations
    assert second.content[METRICS]["epsilon-total"] <= CFG.epsilon * (1 + 1e-6)
    assert second.content[METRICS]["epsilon-total"] > first.content[METRICS]["epsilon-total"]

    # The run planned two rounds: the budget is spent (a SuperNode turns this into an error
    # reply; called in process, the ClientApp raises).
    with pytest.raises(PrivacyBudgetError, match="spent"):
        _train(3, node)
    ledger = json.loads((tmp_path / "partition-1" / "ledger.json").read_text())
    assert sum(ledger["steps"]) == 2 * CFG.iterations  # nothing more was released


def test_without_a_state_dir_the_client_warns_that_restarts_lose_its_ledger(monkeypatch):
    monkeypatch.delenv("FEDCL_DD_CLIENT_STATE", raising=False)
    with pytest.warns(UserWarning, match="restart loses"):
        reply = _train(1, {"partition-id": 1, "num-partitions": 4})
    assert not reply.has_error(), reply.error


PLAIN = FedConfig(preset="digits-iid-4", rounds=3, ipc=2, iterations=2)


def _upload(reply: Message) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error
    return dict(reply.content[SYNTHETIC].to_torch_state_dict())


def test_a_round_redone_after_a_restart_starts_where_its_first_attempt_did(tmp_path):
    """Iterative mode warm-starts from the client's set of the round before: a round that ran,
    was lost with the server, and runs again after a restart uploads what its first attempt
    did (the set that attempt wrote is not its start). Only the two latest rounds' sets stay."""
    node = {"partition-id": 1, "num-partitions": 4, "state-dir": str(tmp_path)}
    train_in_process(PLAIN, 1, node)
    first = _upload(train_in_process(PLAIN, 2, node))
    again = _upload(train_in_process(PLAIN, 2, node))  # a fresh context: a restarted client
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # The warm start is used: without round 1's set, round 2 uploads something else.
    cold = _upload(train_in_process(PLAIN, 2, {**node, "state-dir": str(tmp_path / "empty")}))
    assert not all(torch.equal(first[k], cold[k]) for k in first)
    train_in_process(PLAIN, 3, node)
    kept = sorted(p.name for p in (tmp_path / "partition-1").glob("synthetic*"))
    assert kept == ["synthetic-round2.safetensors", "synthetic-round3.safetensors"]


def test_the_unnumbered_set_of_an_older_run_is_its_warm_start(tmp_path):
    """A state directory written before sets were kept by round holds one unnumbered set: a
    resumed run starts from it, and drops it once a newer round's set can stand in."""
    node = {"partition-id": 1, "num-partitions": 4, "state-dir": str(tmp_path)}
    train_in_process(PLAIN, 1, node)
    client = tmp_path / "partition-1"
    (client / "synthetic-round1.safetensors").rename(client / "synthetic.safetensors")
    resumed = _upload(train_in_process(PLAIN, 2, node))
    assert (client / "synthetic.safetensors").is_file()  # round 2 may yet be redone from it
    train_in_process(PLAIN, 1, {**node, "state-dir": str(tmp_path / "fresh")})
    whole = _upload(train_in_process(PLAIN, 2, {**node, "state-dir": str(tmp_path / "fresh")}))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    cold = _upload(train_in_process(PLAIN, 2, {**node, "state-dir": str(tmp_path / "empty")}))
    assert not all(torch.equal(resumed[k], cold[k]) for k in whole)  # the old set was used
    train_in_process(PLAIN, 3, node)
    assert not (client / "synthetic.safetensors").exists()
