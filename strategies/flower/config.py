"""The run configuration, shared by the ServerApp, the ClientApp and ``fedcl-dd simulate``.

One flat set of hyphenated keys, as Flower's run config (``[tool.flwr.app.config]`` in
``pyproject.toml``, ``flwr run . --run-config "k=v"``) and ``ConfigRecord`` carry them. The
server sends the whole configuration with every train message, so clients need nothing
but their ``partition-id`` / ``num-partitions`` node config (and a data root).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from fedcl_dd.objectives import OBJECTIVES
from fedcl_dd.recipe import PARAMS, STORAGE_DTYPES, Recipe
from fedcl_dd.scenarios.federated import Preset, parse_preset

__all__ = ["FedConfig", "ALGORITHMS", "MODES", "POOLS"]

ALGORITHMS = ("synthetic", "fedavg", "fedprox")
MODES = ("one-shot", "iterative")
POOLS = ("none", "latest")


@dataclass
class FedConfig:
    """Everything a federated run is made of. Zero means "the default" for optional numbers."""

    preset: str = "digits-iid-4"
    seed: int = 0
    algorithm: str = "synthetic"  # synthetic | fedavg | fedprox
    rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0  # of the nodes asked to evaluate the global model locally; 0 skips it
    min_nodes: int = 0  # nodes to wait for before a round; 0: every client of the preset
    round_timeout: float = 3600.0  # seconds the server waits for replies; late replies count as failed
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
    real_per_class: int = 0  # 0: the objective's default (256)
    perturb: float = 0.05  # FedDM: networks = global weights + this relative Gaussian perturbation
    epsilon: float = 0.0  # > 0: record-level (epsilon, delta)-DP per client over the whole run
    delta: float = 1e-5
    clip: float = 1.0
    # --- server ---
    pool: str = "latest"  # latest: train on every client's newest accepted set; none: this round's only
    server_epochs: int = 0  # 0: 300 for one-shot (from scratch), 30 per round for iterative (fine-tuning)
    server_lr: float = 0.01
    # --- FedAvg / FedProx clients ---
    local_epochs: int = 1
    local_lr: float = 0.01
    batch_size: int = 64
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        checks = {
            "algorithm": (self.algorithm, ALGORITHMS),
            "mode": (self.mode, MODES),
            "method": (self.method, tuple(OBJECTIVES)),
            "param": (self.param, PARAMS),
            "storage": (self.storage, tuple(STORAGE_DTYPES)),
            "pool": (self.pool, POOLS),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{key.replace('_', '-')}={value!r} is not one of {list(allowed)}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.algorithm == "synthetic" and self.mode == "one-shot" and self.rounds != 1:
            raise ValueError(f"one-shot mode runs exactly one round, got rounds={self.rounds}; use mode=iterative")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must lie in [0, 1], got {self.fraction_evaluate}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must lie in (0, 1], got {self.fraction_train}")
        if self.epsilon < 0 or not 0.0 < self.delta < 1.0:
            raise ValueError(f"need epsilon >= 0 and 0 < delta < 1, got epsilon={self.epsilon}, delta={self.delta}")
        if self.algorithm == "synthetic" and (self.method == "dm-dp") != (self.epsilon > 0):
            raise ValueError("private clients need method=dm-dp together with epsilon > 0 (and vice versa)")
        self.preset_obj  # a bad preset name fails here, not in a client

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
        """The clients' distillation recipe. A private client's sigma is planned for the whole run."""
        objective_args: dict[str, Any] = {}
        if self.real_per_class > 0 and self.method != "tm":
            objective_args["real_per_class"] = self.real_per_class
        if self.method == "dm-dp":
            objective_args.update(
                clip=self.clip, delta=self.delta, epsilon=self.epsilon, iterations=self.rounds * self.iterations
            )
        return Recipe(
            method=self.method,
            param=self.param,
            ipc=self.ipc,
            budget_bytes=self.budget_bytes or None,
            storage=self.storage,
            iterations=self.iterations,
            lr_images=self.lr_images or None,
            objective_args=objective_args,
        )

    def budget_limit(self) -> int:
        """The most bytes any client may upload: the budget for a client holding every class."""
        spec = self.preset_obj.spec
        return self.recipe().budget_for(spec, spec.num_classes)

    # --- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Hyphenated keys, as in the run config and the ConfigRecord."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], strict: bool = True) -> "FedConfig":
        """From hyphenated (or underscored) keys; unknown keys are an error when ``strict``."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                if strict:
                    raise ValueError(f"unknown setting {key!r}; known: {sorted(k.replace('_', '-') for k in known)}")
                continue
            default = known[name].default
            kwargs[name] = type(default)(value) if default is not dataclasses.MISSING else value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "FedConfig":
        return dataclasses.replace(self, **changes)
