"""Privacy accounting for record-level differential privacy, on top of Opacus's RDP accountant.

Mechanisms here are subsampled Gaussian mechanisms (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016): each step releases a query of L2 sensitivity C on a
Poisson subsample (rate q) with N(0, sigma^2 C^2) noise. Their composition is tracked in
Rényi DP (Mironov, "Rényi Differential Privacy", CSF 2017; Mironov, Talwar & Zhang, "Rényi
Differential Privacy of the Sampled Gaussian Mechanism", 2019) and converted to
(epsilon, delta)-DP with Balle et al.'s bound ("Hypothesis Testing Interpretations and
Renyi Differential Privacy", AISTATS 2020, Thm. 21) -- all computed by Opacus
(Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021).

:class:`PrivacyLedger` keeps a running total that survives checkpoints and messages, so a
federated client can add up its spending over rounds and a server can keep one ledger per
client. :func:`noise_for_target` and :func:`epsilon_for` answer the two planning questions.
:class:`PrivateRandom` draws the noise and the Poisson masks of a release from randomness
that nobody holding the run's seeds can reproduce.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "PrivacyBudgetError",
    "PrivacyLedger",
    "PrivateRandom",
    "epsilon_for",
    "noise_for_target",
]


def _opacus_rdp() -> Any:
    """Opacus's RDP analysis module, imported on first use: importing Opacus (its optimizers,
    SciPy's stats) costs a process about 2 s, and every Ray actor, SuperNode and ClientApp of
    a run that releases nothing private would pay it for nothing."""
    from opacus.accountants.analysis import rdp

    return rdp


def _orders() -> list[float]:
    """The RDP orders Opacus's accountant tracks (its default)."""
    from opacus.accountants import RDPAccountant

    return RDPAccountant.DEFAULT_ALPHAS


# A client-held key must resist guessing: 128 bits at least.
MIN_KEY_BYTES = 16


class PrivateRandom:
    """The randomness of private releases: Gaussian noise and Poisson masks.

    A seeded ``torch.Generator`` will not do: whoever knows the seed (a federated server
    chooses and sends it) can replay the draws and subtract the noise. Without ``key``
    (the default) every draw comes from the operating system's CSPRNG (``os.urandom``),
    as Opacus's ``secure_mode`` draws from a cryptographic generator; releases are then
    not reproducible. With ``key``, a secret the data holder keeps (at least 16 bytes),
    draws come from SHAKE-256 of the key, ``context`` and a counter: reproducible by the
    key's holder only. Give every run its own ``context`` (e.g. the round and partition),
    so that two runs never share noise.

    Each standard normal is the sum of four Box-Muller draws divided by two, the defence of
    Holohan & Braghin ("Secure Random Sampling in Differential Privacy", ESORICS 2021)
    against floating-point attacks that Opacus's ``secure_mode`` also uses.
    """

    def __init__(self, key: bytes | str | None = None, context: str = "") -> None:
        if isinstance(key, str):
            key = key.encode()
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"a private key of {len(key)} bytes is too easy to guess; use at least "
                f"{MIN_KEY_BYTES} random bytes (e.g. secrets.token_hex(16)), or none for OS entropy"
            )
        self._key = key
        self._context = context.encode()
        self.counter = 0

    @property
    def reproducible(self) -> bool:
        """Whether draws follow from a key (True) or from OS entropy (False)."""
        return self._key is not None

    def _bytes(self, n: int) -> bytes:
        if self._key is None:
            return os.urandom(n)
        stream = hashlib.shake_256()
        for part in (self._key, self._context, self.counter.to_bytes(8, "little")):
            stream.update(len(part).to_bytes(8, "little") + part)  # unambiguous framing
        self.counter += 1
        return stream.digest(n)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A ``torch.Generator`` seeded with 64 bits of this source, for libraries that take one
        (Opacus's noise and Poisson sampler). Its seed is as secret as this source; the
        generator itself is not a cryptographic one (Opacus's ``secure_mode`` needs torchcsprng)."""
        seed = int.from_bytes(self._bytes(8), "little") >> 1  # manual_seed takes < 2**63
        return torch.Generator(device=device).manual_seed(seed)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms in the open interval (0, 1), 53 random bits each."""
        raw = np.frombuffer(self._bytes(8 * n), dtype="<u8") >> np.uint64(11)
        return torch.from_numpy((raw.astype(np.float64) + 0.5) / 2.0**53)

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard normal float64 draws of ``shape``."""
        n = math.prod(shape)
        u = self.uniform(8 * n).view(4, 2, n)
        draws = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
        return (draws.sum(0) / 2.0).view(*shape)

    def state_dict(self) -> dict[str, int]:
        """The position in a keyed stream (the key itself is never stored)."""
        return {"counter": self.counter}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counter = int(state["counter"])


class PrivacyBudgetError(ValueError):
    """A privacy target that is invalid or cannot be met; the message says what to change."""


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(
            f"delta must lie in (0, 1), got {delta}; a usual choice is below 1/(number of records)"
        )


def _check_sample_rate(sample_rate: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyBudgetError(f"sample_rate must lie in (0, 1], got {sample_rate}")


class PrivacyLedger:
    """Running (epsilon, delta) spent by a sequence of subsampled Gaussian mechanisms.

    The history is a list of run-length encoded ``(noise_multiplier, sample_rate, steps)``
    entries, as an :class:`opacus.accountants.RDPAccountant` keeps it. :meth:`epsilon` gives
    the same value as that accountant's ``get_epsilon(delta)`` on the same history, but
    caches the one-step RDP curve per ``(noise_multiplier, sample_rate)``: Opacus recomputes
    it on every call (about 0.1 s for q < 1), which would dominate a loop that reports
    epsilon every iteration.
    """

    def __init__(self) -> None:
        self._history: list[tuple[float, float, int]] = []
        self._one_step: dict[tuple[float, float], np.ndarray] = {}

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """A copy of the ``(noise_multiplier, sample_rate, steps)`` entries, oldest first."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total number of mechanism steps recorded."""
        return sum(n for _, _, n in self._history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` releases with noise ``noise_multiplier * C`` on Poisson rate ``sample_rate``."""
        sigma, q, n = float(noise_multiplier), float(sample_rate), int(num_steps)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(
                f"noise_multiplier must be a positive finite number, got {noise_multiplier}"
            )
        _check_sample_rate(q)
        if n < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        if n == 0:
            return
        history = self._history
        # The accountant's own run-length encoding (RDPAccountant.step), but adding n steps in O(1):
        # a server may book a client's whole round at once.
        if history and history[-1][0] == sigma and history[-1][1] == q:
            history[-1] = (sigma, q, history[-1][2] + n)
        else:
            history.append((sigma, q, n))

    def _rdp(self, history: list[tuple[float, float, int]]) -> np.ndarray:
        orders = _orders()
        total = np.zeros(len(orders))
        for sigma, q, n in history:
            key = (sigma, q)
            if key not in self._one_step:
                self._one_step[key] = _opacus_rdp().compute_rdp(
                    q=q, noise_multiplier=sigma, steps=1, orders=orders
                )
            # compute_rdp is linear in steps (it returns the one-step curve times steps).
            total = total + self._one_step[key] * n
        return total

    def _epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        _check_delta(delta)
        if not history:
            return 0.0
        eps, _ = _opacus_rdp().get_privacy_spent(
            orders=_orders(), rdp=self._rdp(history), delta=delta
        )
        return float(eps)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        return self._epsilon(self._history, delta)

    def projected_epsilon(
        self, delta: float, noise_multiplier: float, sample_rate: float, num_steps: int = 1
    ) -> float:
        """Epsilon that would be spent after ``num_steps`` more steps, without recording them."""
        trial = PrivacyLedger()
        trial._history = self.history
        trial._one_step = self._one_step  # share the cache: same curves
        trial.step(noise_multiplier, sample_rate, num_steps)
        return trial.epsilon(delta)

    def state_dict(self) -> dict[str, list[float] | list[int]]:
        """The history as three flat lists of plain numbers.

        Flat lists fit JSON, ``torch.save``/``torch.load(weights_only=True)`` and Flower's
        ``MetricRecord`` (which takes lists of ints or floats, not nested lists).
        """
        history = self._history
        return {
            "noise_multipliers": [float(s) for s, _, _ in history],
            "sample_rates": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history by one saved with :meth:`state_dict` (validated)."""
        try:
            sigmas, rates, steps = (
                list(state[k]) for k in ("noise_multipliers", "sample_rates", "steps")
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"not a privacy ledger state: need lists 'noise_multipliers', 'sample_rates', 'steps' ({exc})"
            ) from exc
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError(
                f"ledger lists differ in length: {len(sigmas)}, {len(rates)}, {len(steps)}"
            )
        if any(int(n) != n for n in steps):
            raise ValueError(f"ledger steps must be whole numbers, got {steps}")
        fresh = PrivacyLedger()
        for sigma, q, n in zip(sigmas, rates, steps, strict=True):
            fresh.step(sigma, q, int(n))
        self._history = fresh._history


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` subsampled Gaussian steps (RDP accountant)."""
    ledger = PrivacyLedger()
    ledger.step(noise_multiplier, sample_rate, steps)
    return ledger.epsilon(delta)


def noise_for_target(
    target_epsilon: float, target_delta: float, sample_rate: float, steps: int
) -> float:
    """The noise multiplier that keeps ``steps`` steps at rate ``sample_rate`` within (epsilon, delta).

    Uses Opacus's binary search (``get_noise_multiplier``) with the RDP accountant, to within
    0.5% of ``target_epsilon`` from below. Raises :class:`PrivacyBudgetError` for invalid
    targets and for targets that no noise level reaches (about log(1/delta)/62: 0.10 at
    delta=1e-5, the floor of the RDP-to-DP conversion over Opacus's orders, up to 63).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyBudgetError(
            f"target epsilon must be a positive finite number, got {target_epsilon}"
        )
    _check_delta(target_delta)
    _check_sample_rate(sample_rate)
    if int(steps) != steps or steps < 1:
        raise PrivacyBudgetError(f"steps must be a whole number >= 1, got {steps}")
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier  # see _opacus_rdp

    # The search visits extreme noise levels whose optimal RDP order is at the edge of the grid;
    # Opacus warns about each, which says nothing about the answer.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    sample_rate=sample_rate,
                    steps=int(steps),
                    accountant="rdp",
                    # Opacus's default tolerance is absolute (0.01): too loose for small targets.
                    epsilon_tolerance=0.005 * target_epsilon,
                )
            )
        except ValueError as exc:
            # Opacus gives up past MAX_SIGMA. What stops it is the conversion's floor: over orders up
            # to 63, epsilon cannot drop much below log(1/delta)/62 however much noise is added, so
            # fewer steps or a lower sample rate do not help; only a larger epsilon or delta does.
            floor = epsilon_for(MAX_SIGMA, sample_rate, int(steps), target_delta)
            raise PrivacyBudgetError(
                f"epsilon={target_epsilon:g} at delta={target_delta:g} cannot be reached: the RDP accountant "
                f"certifies no less than epsilon={floor:.3g} at this delta, whatever the noise, for {int(steps)} "
                f"steps at sample rate {sample_rate:g}. Use a larger epsilon (above {floor:.3g}) or a larger delta."
            ) from exc
