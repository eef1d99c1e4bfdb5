"""Our strategy inside a ServerApp of your own: the README's snippet, as a file that runs.

Run it on the Ray backend with 4 simulated SuperNodes (scikit-learn's digits, offline)::

    python examples/flower_server_app.py

``tests/test_examples.py`` runs it the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedcl_dd.strategies.flower import FedConfig, SyntheticSetStrategy
from fedcl_dd.strategies.flower.client_app import app as client_app
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/example")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FedConfig(preset="digits-iid-4", rounds=2, ipc=5, iterations=20, server_epochs=20)
    strategy = SyntheticSetStrategy(cfg, checkpoint=OUT / "checkpoint.pt")
    result = strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(),  # the run's model, from the run seed
        num_rounds=cfg.rounds,
        evaluate_fn=strategy.evaluate_fn(),  # test split of the run's dataset
    )
    final = result.evaluate_metrics_serverapp[cfg.rounds]["accuracy"]
    print(f"accuracy after {cfg.rounds} rounds: {final:.4f}")


if __name__ == "__main__":
    run_simulation(server_app=app, client_app=client_app, num_supernodes=4)
