"""A client's ledger and warm-start set survive restarts: written before the reply leaves,
read back by a client that lost its ``context.state``, and a spent budget stays spent."""

from __future__ import annotations

import json

import pytest
from fedcl_dd.strategies.flower.config import FedConfig
from fedcl_dd.strategies.flower.payload import METRICS
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
    assert (tmp_path / "partition-1" / "synthetic.safetensors").is_file()  # warm start kept

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
