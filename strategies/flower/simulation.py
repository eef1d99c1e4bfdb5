"""Run a federated configuration on Flower's Ray simulation backend, in this process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedcl_dd.cli import resolve_device

from .client_app import app as default_client_app
from .client_state import STATE_ENV
from .config import FedConfig
from .server_app import run_server

__all__ = ["simulate"]


def simulate(
    cfg: FedConfig,
    out: str | Path,
    resume: bool = False,
    data_root: str | Path | None = None,
    device: torch.device | None = None,
    cpus_per_client: float = 1.0,
    client_app: ClientApp | None = None,
) -> dict[str, Any]:
    """Simulate ``cfg`` with one virtual SuperNode per client of its preset; return the results.

    Clients keep their privacy ledgers and warm-start sets in ``out/client-state`` (see
    :mod:`~fedcl_dd.strategies.flower.client_state`), which ``resume`` continues and a fresh
    run clears. Uses Flower's ``run_simulation`` (deprecated in favour of ``flwr run``, which reads the
    configuration from ``pyproject.toml`` instead of taking it from the caller).
    """
    out = Path(out)
    # Clients keep their ledgers and warm-start sets under the run's folder: a resumed run
    # continues them; a fresh one starts them anew.
    client_state = out / "client-state"
    if not resume and client_state.exists():
        shutil.rmtree(client_state)
    previous_state_env = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = str(client_state.resolve())  # Ray workers inherit it
    if data_root is not None:
        # Simulated clients run in Ray workers, which inherit this environment.
        os.environ["FEDCL_DD_DATA"] = str(Path(data_root).resolve())
    device = device or resolve_device()
    results: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        results.update(
            run_server(
                grid,
                cfg,
                out,
                resume=resume,
                data_root=str(data_root) if data_root else None,
                device=device,
            )
        )

    gpus = 0.0 if device.type == "cpu" else min(1.0, cpus_per_client / (os.cpu_count() or 1))
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app or default_client_app,
            num_supernodes=cfg.preset_obj.num_clients,
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus}},
        )
    finally:  # this process may run other clients later (tests, notebooks)
        if previous_state_env is None:
            os.environ.pop(STATE_ENV, None)
        else:
            os.environ[STATE_ENV] = previous_state_env
    if not results:
        raise RuntimeError("the simulation ended without results; see the log above")
    return results
