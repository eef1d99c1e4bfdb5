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
import re
import warnings
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context

from fedcl_dd.io import write_json
from fedcl_dd.privacy import PrivacyLedger
from fedcl_dd.synthetic import SyntheticSet

__all__ = ["ClientState"]

_SET, _META, _LEDGER = "fedcl-synthetic", "fedcl-synthetic-meta", "fedcl-ledger"
_LEGACY_SET = "synthetic.safetensors"  # one unnumbered set, as runs before sets by round wrote
_ROUND_SET = re.compile(r"synthetic-round(\d+)\.safetensors")
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

    def warm_start(self, server_round: int) -> SyntheticSet | None:
        """The set this client uploaded in its latest round before ``server_round`` (iterative
        mode starts from it). By round, not the newest file: a round redone after a restart
        starts from the set its first attempt started from, as an uninterrupted run does, not
        from the one that attempt already wrote."""
        if self.dir is not None:
            earlier = [r for r in self._saved_rounds() if r < server_round]
            if earlier:
                return SyntheticSet.load(self._set_path(max(earlier)))
            legacy = self.dir / _LEGACY_SET
            return SyntheticSet.load(legacy) if legacy.is_file() else None
        if _SET not in self.context.state:
            return None
        tensors = self.context.state.array_records[_SET].to_torch_state_dict()
        meta = self.context.state.config_records[_META]
        return SyntheticSet.from_state(dict(tensors), {k: str(v) for k, v in meta.items()})

    def save_warm_start(self, syn: SyntheticSet, server_round: int) -> None:
        """Keep ``syn`` as this client's set of ``server_round``; on disk the sets of the two
        latest rounds are kept, enough for a redone round to find its start."""
        if self.dir is None:
            self.context.state[_SET] = ArrayRecord(syn.state_tensors())
            self.context.state[_META] = ConfigRecord(dict(syn.metadata()))
            return
        syn.save(self._set_path(server_round))
        rounds = self._saved_rounds()
        for r in rounds:
            if r < server_round - 1:
                self._set_path(r).unlink(missing_ok=True)
        if server_round - 1 in rounds:  # the unnumbered set of older runs is no longer needed
            (self.dir / _LEGACY_SET).unlink(missing_ok=True)

    def _set_path(self, server_round: int) -> Path:
        assert self.dir is not None
        return self.dir / f"synthetic-round{server_round}.safetensors"

    def _saved_rounds(self) -> list[int]:
        assert self.dir is not None
        names = (_ROUND_SET.fullmatch(p.name) for p in self.dir.glob("synthetic-round*"))
        return sorted(int(m.group(1)) for m in names if m)
