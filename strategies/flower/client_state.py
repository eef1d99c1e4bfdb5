"""What a client keeps between rounds: its privacy ledger and its warm-start set.

With a state directory -- node config ``state-dir``, else ``$FEDCL_DD_CLIENT_STATE`` (which
:func:`~fedcl_dd.strategies.flower.simulation.simulate` sets under the run's output folder)
-- both are files in ``<dir>/partition-<id>/``, written atomically, so they survive a
restarted simulation or SuperNode: the ledger is written before the reply that carries the
release leaves the client (write-ahead), and a restarted client that has spent its budget
refuses to release again. Without one, they live in Flower's ``context.state``, which a
restart loses (a warning says so in private runs).

The directory is the node's own setting, never the server's: a server that chose it could
point a client at an empty ledger.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context

from fedcl_dd.io import write_json
from fedcl_dd.privacy import PrivacyLedger
from fedcl_dd.synthetic import SyntheticSet

__all__ = ["ClientState"]

_SET, _META, _LEDGER = "fedcl-synthetic", "fedcl-synthetic-meta", "fedcl-ledger"
STATE_ENV = "FEDCL_DD_CLIENT_STATE"


class ClientState:
    """This client's durable state (see the module docstring)."""

    def __init__(self, context: Context, partition: int) -> None:
        self.context = context
        root = context.node_config.get("state-dir") or os.environ.get(STATE_ENV)
        self.dir = Path(str(root)) / f"partition-{partition}" if root else None

    @property
    def durable(self) -> bool:
        return self.dir is not None

    def ledger(self) -> PrivacyLedger:
        """Every release this client has made (empty before the first)."""
        ledger = PrivacyLedger()
        if self.dir is not None:
            path = self.dir / "ledger.json"
            if path.is_file():
                ledger.load_state_dict(json.loads(path.read_text()))
        elif _LEDGER in self.context.state:
            stored = self.context.state.config_records[_LEDGER]
            ledger.load_state_dict({k: v for k, v in stored.items() if isinstance(v, list)})
        return ledger

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        """Record ``ledger`` (call before the reply that carries its releases is returned)."""
        if self.dir is not None:
            write_json(ledger.state_dict(), self.dir / "ledger.json")
        else:
            warnings.warn(
                "this client's privacy ledger lives in context.state, which a restart loses; "
                f"give the node a state-dir (node config) or set ${STATE_ENV}",
                stacklevel=2,
            )
            self.context.state[_LEDGER] = ConfigRecord(dict(ledger.state_dict()))

    def warm_start(self) -> SyntheticSet | None:
        """The set this client uploaded last (iterative mode starts the next round from it)."""
        if self.dir is not None:
            path = self.dir / "synthetic.safetensors"
            return SyntheticSet.load(path) if path.is_file() else None
        if _SET not in self.context.state:
            return None
        tensors = self.context.state.array_records[_SET].to_torch_state_dict()
        meta = self.context.state.config_records[_META]
        return SyntheticSet.from_state(dict(tensors), {k: str(v) for k, v in meta.items()})

    def save_warm_start(self, syn: SyntheticSet) -> None:
        if self.dir is not None:
            syn.save(self.dir / "synthetic.safetensors")
        else:
            self.context.state[_SET] = ArrayRecord(syn.state_tensors())
            self.context.state[_META] = ConfigRecord(dict(syn.metadata()))
