"""The run configuration, shared by the ServerApp, the ClientApp and ``fedcl-dd simulate``.

One flat set of hyphenated keys, as Flower's run config (``[tool.flwr.app.config]`` in
``pyproject.toml``, ``flwr run . --run-config "k=v"``) and ``ConfigRecord`` carry them. The
server sends the whole configuration with every train message, so clients need nothing
but their ``partition-id`` / ``num-partitions`` node config (and a data root).

Besides the run's own fields, every option a registered objective or parameterization
declares is a key (``real-per-class``, ``noise-multiplier``, ``bases`` ...), at its
declared default; where an option shares a field's name (``epsilon``, ``delta``, ``clip``:
also DP-SGD's), the field is its value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedcl_dd.scenarios.federated import Preset, parse_preset

from fedcl_dd.compiled import check_mode
from fedcl_dd.precision import PRECISIONS
from fedcl_dd.privacy import PrivacyBudgetError, noise_for_target
from fedcl_dd.recipe import STORAGE_DTYPES, Recipe
from fedcl_dd.registry import OBJECTIVES, PARAMETERIZATIONS, declared_options, get_objective
from fedcl_dd.screen import DEFAULT_SCREEN_THRESHOLD

__all__ = ["ALGORITHMS", "MODES", "POOLS", "FedConfig"]

ALGORITHMS = ("synthetic", "fedavg", "fedprox", "fedavgm")
MODES = ("one-shot", "iterative")
POOLS = ("none", "latest")


@dataclass
class FedConfig:
    """Everything a federated run is made of. Zero means "the default" for optional numbers.

    ``options`` holds the objective's and parameterization's options that differ from
    their declared defaults (by their underscored names).
    """

    preset: str = "digits-iid-4"
    seed: int = 0
    algorithm: str = "synthetic"  # synthetic | fedavg | fedprox | fedavgm
    rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = (
        1.0  # of the nodes asked to evaluate the global model locally; 0 skips it
    )
    min_nodes: int = 0  # nodes to wait for before a round; 0: every client of the preset
    round_timeout: float = (
        3600.0  # seconds the server waits for replies; late replies count as failed
    )
    node_wait: float = 120.0  # seconds to wait for min-nodes before round 1, then go on with those

    model: str = "convnet"
    # --- synthetic-set clients ---
    mode: str = "iterative"  # one-shot: one round, the union trained once; iterative: FedDM
    method: str = "dm"
    param: str = "pixels"
    ipc: int = 10
    budget_bytes: int = 0  # 0: the bytes of ipc images per held class
    storage: str = "fp32"
    iterations: int = 200
    lr_images: float = 0.0  # 0: the method's published value
    perturb: float = 0.05  # FedDM: networks = global weights + this relative Gaussian perturbation
    epsilon: float = 0.0  # > 0: record-level (epsilon, delta)-DP per client over the whole run
    delta: float = 1e-5
    clip: float = 1.0
    # --- server ---
    pool: str = (
        "latest"  # latest: train on every client's newest accepted set; none: this round's only
    )
    server_epochs: int = (
        0  # 0: 300 for one-shot (from scratch), 30 per round for iterative (fine-tuning)
    )
    server_lr: float = 0.01
    # > 0: refuse uploads whose peers' class means classify fewer than this share of their
    # images as labelled, or whose pixel magnitude strays from theirs (fedcl_dd.screen)
    screen: float = 0.0
    # "bf16": distillation losses, the server's training and the FedAvg/FedProx clients' local
    # training under bfloat16 autocast where the device computes it natively
    # (fedcl_dd.precision; else fp32 with one warning; dm-dp and DP-SGD stay fp32)
    precision: str = "fp32"
    # A fedcl_dd.compiled mode ("default" ...): the clients' matching networks (distribution-
    # matching methods), the server's training of the global model and the FedAvg/FedProx
    # clients' local training (not DP-SGD's) run compiled; each process compiles once. "": eager.
    compile: str = ""
    # --- FedAvg / FedProx / FedAvgM clients ---
    local_epochs: int = 1
    local_lr: float = 0.01
    batch_size: int = 64
    proximal_mu: float = 0.01
    # FedAvgM (Hsu et al., 2019; Flower's FedAvgM): the server's momentum on the clients'
    # averaged update, and its learning rate on that update (momentum 0 and 1.0: FedAvg)
    server_momentum: float = 0.9
    server_update_lr: float = 1.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "algorithm": (self.algorithm, ALGORITHMS),
            "mode": (self.mode, MODES),
            "method": (self.method, tuple(OBJECTIVES)),
            "param": (self.param, tuple(PARAMETERIZATIONS)),
            "storage": (self.storage, tuple(STORAGE_DTYPES)),
            "pool": (self.pool, POOLS),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{key.replace('_', '-')}={value!r} is not one of {list(allowed)}")
        self.options = _normalized(self.options)
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.algorithm == "synthetic" and self.mode == "one-shot" and self.rounds != 1:
            raise ValueError(
                f"one-shot mode runs exactly one round, got rounds={self.rounds}; use mode=iterative"
            )
        for key in ("round_timeout", "node_wait"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{key.replace('_', '-')} must be a finite number of seconds >= 0, got {value}"
                )
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must lie in [0, 1], got {self.fraction_evaluate}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must lie in (0, 1], got {self.fraction_train}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.compile:
            check_mode(self.compile, "empty")
        if not 0.0 <= self.screen <= 1.0:
            raise ValueError(
                f"screen must lie in [0, 1] (0: off; e.g. {DEFAULT_SCREEN_THRESHOLD}), got {self.screen}"
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(
                f"server-momentum must lie in [0, 1) (FedAvgM's, e.g. 0.9), got {self.server_momentum}"
            )
        if not (math.isfinite(self.server_update_lr) and self.server_update_lr > 0):
            raise ValueError(
                f"server-update-lr must be a finite number > 0 (FedAvgM's, e.g. 1.0), "
                f"got {self.server_update_lr}"
            )
        if self.epsilon < 0 or not 0.0 < self.delta < 1.0:
            raise ValueError(
                f"need epsilon >= 0 and 0 < delta < 1, got epsilon={self.epsilon}, delta={self.delta}"
            )
        private = sorted(n for n, c in OBJECTIVES.items() if c.private)
        if self.algorithm == "synthetic" and get_objective(self.method).private != (
            self.epsilon > 0
        ):
            raise ValueError(
                f"private clients need a private method ({', '.join(private)}) together with epsilon > 0, "
                f"and epsilon > 0 needs one; got method={self.method}, epsilon={self.epsilon}"
            )
        _ = self.preset_obj  # a bad preset name fails here, not in a client
        if self.algorithm == "synthetic":
            self.recipe()  # options that do not apply to the method or are out of range fail here too
        if self.private:
            self._check_privacy_budget()

    def _check_privacy_budget(self) -> None:
        """Refuse an (epsilon, delta) that the clients cannot keep over the whole run, before round 1.

        The clients calibrate their noise with :func:`fedcl_dd.privacy.noise_for_target` for
        every release of the run (dm-dp: ``rounds x iterations``); this asks it the same
        question up front, at sample rate 1. What makes a target unreachable is the
        RDP-to-DP conversion's floor, which moves by under 1e-5 with the rate up to 1e5
        releases, while the accountant takes seconds per evaluation at rates such as 0.5
        (and this runs wherever a configuration is read: every client message).
        """
        if self.algorithm == "synthetic":
            releases = self.planned_iterations
            who = f"{self.method} clients"
            over = f"rounds={self.rounds} x iterations={self.iterations} = {releases} releases"
            fix = "use iterations >= 1"
        else:
            # DP-SGD: rounds x local-epochs x batches per epoch steps at rate batch / records; a
            # client whose records fit one batch takes the fewest, at rate 1.
            releases = self.rounds * self.local_epochs
            who = f"{self.algorithm} clients (DP-SGD)"
            over = f"rounds={self.rounds} x local-epochs={self.local_epochs} epochs or more"
            fix = "use local-epochs >= 1"
        if releases < 1:  # nothing would be learned from the private data: a useless run
            raise ValueError(
                f"epsilon={self.epsilon:g} is set, but the {who} would make no private release "
                f"over {over}; {fix}"
            )
        try:
            noise_for_target(self.epsilon, self.delta, 1.0, releases)
        except PrivacyBudgetError as exc:
            raise PrivacyBudgetError(
                f"the {who} cannot keep epsilon={self.epsilon:g} (delta={self.delta:g}) over "
                f"{over}: {exc}"
            ) from exc

    @property
    def preset_obj(self) -> Preset:
        return parse_preset(self.preset, seed=42 + self.seed)

    @property
    def nodes_required(self) -> int:
        return self.min_nodes or self.preset_obj.num_clients

    @property
    def private(self) -> bool:
        return self.epsilon > 0

    @property
    def epochs_on_server(self) -> int:
        if self.server_epochs > 0:
            return self.server_epochs
        return 300 if self.mode == "one-shot" else 30

    def recipe(self) -> Recipe:
        """The clients' distillation recipe (its objective: :meth:`planned_iterations` releases)."""
        obj, par = get_objective(self.method), PARAMETERIZATIONS[self.param]
        mine = {o.name for o in obj.options + par.options}
        stray = sorted(k for k in self.options if k not in mine)
        if stray:
            raise ValueError(
                f"{', '.join(k.replace('_', '-') for k in stray)} do(es) not apply to method={self.method} "
                f"with param={self.param}; its options are {sorted(k.replace('_', '-') for k in mine)}"
            )
        shared = {name: getattr(self, name) for name in mine if name in _FIELDS}
        return Recipe(
            method=self.method,
            param=self.param,
            ipc=self.ipc,
            budget_bytes=self.budget_bytes or None,
            storage=self.storage,
            iterations=self.iterations,
            lr_images=self.lr_images or None,
            options={**self.options, **_from_flat(shared)},
        )

    @property
    def planned_iterations(self) -> int:
        """Every S update of a client over the whole run, which a private objective plans its noise for."""
        return self.rounds * self.iterations

    def budget_limit(self) -> int:
        """The most bytes any client may upload: the budget for a client holding every class."""
        spec = self.preset_obj.spec
        return self.recipe().budget_for(spec, spec.num_classes)

    # --- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Hyphenated keys, as in the run config and the ConfigRecord: the fields, then every
        registered option (at its declared default unless set)."""
        out = {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in fields(self)
            if f.name != "options"
        }
        for name, (opt, _) in declared_options().items():
            if name not in _FIELDS:
                out[opt.key] = self.options.get(name, opt.flat_default)
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], strict: bool = True) -> FedConfig:
        """From hyphenated (or underscored) keys; unknown keys are an error when ``strict``."""
        known = {f.name: f for f in fields(cls) if f.name != "options"}
        registered = declared_options()
        kwargs: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in known:
                default = known[name].default
                kwargs[name] = type(default)(value) if default is not dataclasses.MISSING else value
            elif name in registered:
                opt = registered[name][0]
                parsed = opt.from_flat(value)
                if parsed is not None and parsed != opt.default:
                    options[name] = parsed
            elif strict:
                every = sorted(
                    [k.replace("_", "-") for k in known] + [o.key for o, _ in registered.values()]
                )
                raise ValueError(f"unknown setting {key!r}; known: {every}")
        return cls(**kwargs, options=options)

    def replace(self, **changes: Any) -> FedConfig:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name for f in fields(FedConfig)}


def _from_flat(values: dict[str, Any]) -> dict[str, Any]:
    """Run-config field values as the options of the same name (zero: unset where the default is None)."""
    registered = declared_options()
    return {k: registered[k][0].from_flat(v) for k, v in values.items()}


def _normalized(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` parsed, by underscored name, without those at their declared default."""
    registered = declared_options()
    out = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in registered or name in _FIELDS:
            raise ValueError(f"unknown option {key!r}; registered options are {sorted(registered)}")
        parsed = registered[name][0].parse(value)
        if parsed is not None and parsed != registered[name][0].default:
            out[name] = parsed
    return out
