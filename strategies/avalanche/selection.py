"""Settings of a continual run chosen on validation data, never on the test stream.

:func:`choose` runs each setting of a small grid through :func:`~.runner.run_stream` on a
benchmark made by :func:`~fedcl_dd.scenarios.continual.with_validation` (the train stream
minus a class-balanced share held out of each experience, scored on that share), and keeps
the setting with the best final average accuracy on it. A benchmark scored on its test
stream is refused, so a choice cannot depend on a test label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedcl_dd.scenarios.continual import ContinualBenchmark

from .runner import RunConfig, RunResult, run_stream

__all__ = ["Selection", "choose"]


@dataclass
class Selection:
    """The grid, each setting's validation result, and the chosen setting."""

    grid: list[dict[str, Any]]
    scores: list[float] = field(default_factory=list)  # final validation accuracy per setting
    seconds: list[float] = field(default_factory=list)  # distillation + training, per setting

    @property
    def best(self) -> dict[str, Any]:
        """The setting with the highest validation accuracy (the earliest listed on a tie)."""
        return self.grid[max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "validation_accuracy": self.scores,
            "seconds": self.seconds,
            "chosen": self.best,
        }


def choose(
    base: RunConfig,
    grid: Sequence[Mapping[str, Any]],
    bench: ContinualBenchmark,
    on_setting: Callable[[dict[str, Any], RunResult], None] | None = None,
) -> Selection:
    """Run ``base`` with each setting of ``grid`` (fields of :class:`RunConfig`) on the
    validation benchmark ``bench``; return them all with the best one.

    ``on_setting(setting, result)`` is called after each run (e.g. to print a row).
    """
    if bench.eval_stream_name != "valid":
        raise ValueError(
            f"settings are chosen on a validation stream, and this benchmark is scored on its "
            f"{bench.eval_stream_name!r} stream: pass with_validation(benchmark)"
        )
    if not grid:
        raise ValueError("the grid is empty: give at least one setting")
    selection = Selection([dict(s) for s in grid])
    for setting in selection.grid:
        result = run_stream(replace(base, **setting), bench)
        selection.scores.append(result.final_accuracy)
        selection.seconds.append(sum(result.build_seconds) + sum(result.train_seconds))
        if on_setting is not None:
            on_setting(setting, result)
    return selection
