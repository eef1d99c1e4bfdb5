"""The server's privacy account: one ledger per client, booked from the releases it received."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcl_dd.privacy import PrivacyLedger

from .payload import InvalidUpload, Upload, metric_float, metric_int

__all__ = ["PRIVACY_METRICS", "ClientLedgers"]

#: What a private client's reply must carry for the server to account its release.
PRIVACY_METRICS = ("noise-multiplier", "sample-rate", "steps")


class ClientLedgers:
    """A :class:`~fedcl_dd.privacy.PrivacyLedger` per partition id, kept by the server.

    :meth:`book` records a release as soon as it has been received and can be accounted --
    before the budget check, because a refused upload has still left the client: the
    epsilon reported is what the server has seen, refused releases included.
    """

    def __init__(self, epsilon: float, delta: float) -> None:
        self.epsilon_budget = epsilon
        self.delta = delta
        self._ledgers: dict[int, PrivacyLedger] = {}

    def book(self, up: Upload) -> float:
        """Record ``up``'s release for its partition; return that client's epsilon so far.

        Raises :class:`InvalidUpload` (without booking) when the release cannot be accounted:
        missing or malformed ``noise-multiplier``, ``sample-rate`` or ``steps``.
        """
        missing = [k for k in PRIVACY_METRICS if k not in up.metrics]
        if missing:
            raise InvalidUpload(
                f"a private run needs the client's {list(PRIVACY_METRICS)} to account its "
                f"release; missing {missing}"
            )
        sigma = metric_float(up.metrics, "noise-multiplier")
        q = metric_float(up.metrics, "sample-rate")
        steps = metric_int(up.metrics, "steps", low=1)
        ledger = self._ledgers.get(up.partition_id, PrivacyLedger())
        try:
            ledger.step(sigma, q, steps)
        except ValueError as exc:
            raise InvalidUpload(f"unaccountable release: {exc}") from exc
        self._ledgers[up.partition_id] = ledger
        return ledger.epsilon(self.delta)

    def check_budget(self, up: Upload, spent: float) -> None:
        """Refuse ``up`` if its client has now spent more than the budget."""
        if spent > self.epsilon_budget * (1 + 1e-6):
            raise InvalidUpload(
                f"the upload brings client {up.partition_id} to epsilon={spent:.4g} > budget "
                f"{self.epsilon_budget:g}"
            )

    def epsilons(self) -> dict[int, float]:
        """Epsilon spent so far by every client that released anything."""
        return {pid: led.epsilon(self.delta) for pid, led in sorted(self._ledgers.items())}

    def __contains__(self, pid: object) -> bool:
        return pid in self._ledgers

    def __getitem__(self, pid: int) -> PrivacyLedger:
        return self._ledgers[pid]

    def state_dict(self) -> dict[int, dict[str, Any]]:
        return {pid: led.state_dict() for pid, led in self._ledgers.items()}

    def load_state_dict(self, state: Mapping[Any, Mapping[str, Any]]) -> None:
        self._ledgers = {}
        for pid, led_state in state.items():
            self._ledgers[int(pid)] = led = PrivacyLedger()
            led.load_state_dict(led_state)
