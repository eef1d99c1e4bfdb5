"""Progress of long work: tqdm bars, and one line up front saying how long the rest will take.

The line goes to stderr whether or not a bar is shown (a bar is hidden off a terminal, e.g.
in a background run's log), once a few steps after the first have been timed: the first
warms up caches and, with ``compile``, compiles.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

__all__ = ["ETA_AFTER", "StepBar", "say_expected"]

ETA_AFTER = 5  # steps timed (after the first) before the expected duration is said


def say_expected(
    desc: str, per: float, remaining: int, unit: str, left: float | None = None
) -> None:
    """``desc: <per> s per <unit>, about M more minutes for the remaining N <unit>s`` on
    stderr, when the rest (``left`` seconds, default ``per * remaining``) takes over a minute."""
    left = per * remaining if left is None else left
    if left > 60:
        print(
            f"{desc}: {per:.2f} s per {unit}, about {left / 60:.1f} more minutes "
            f"for the remaining {remaining} {unit}s",
            file=sys.stderr,
            flush=True,
        )


class StepBar:
    """A bar over ``total`` equal steps (e.g. every epoch of an evaluation's networks) that
    says the expected duration after :data:`ETA_AFTER` timed steps. ``disable``: None hides
    the bar off a terminal, True always; the line is said either way."""

    def __init__(self, total: int, desc: str, unit: str, disable: bool | None = None) -> None:
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=disable)
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.started = 0, 0.0

    def step(self) -> None:
        self.done += 1
        self.bar.update(1)
        if self.done == 1:
            self.started = time.perf_counter()
        elif self.done == 1 + ETA_AFTER:
            per = (time.perf_counter() - self.started) / ETA_AFTER
            say_expected(self.desc, per, self.total - self.done, self.unit)

    def close(self) -> None:
        self.bar.close()
