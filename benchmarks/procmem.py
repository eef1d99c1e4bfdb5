"""Peak memory of the current process or a process tree (Linux), for the CPU memory figures of
the benchmarks."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak resident set (writing 5 to clear_refs) and return the current one, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")


def peak_since_reset() -> float:
    """Peak resident set since :func:`reset_peak`, in MiB."""
    return status_mib("VmHWM")


def pss_mib(pid: int) -> float | None:
    """Proportional set size of a process in MiB: each shared page divided among the processes
    mapping it, so summing over processes counts shared libraries once (None: unreadable)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return None


class PeakTreeMemory:
    """Peak memory (MiB), while active, of this process and all its descendants, or of the
    processes ``pids()`` names at each sample: ``peak`` sums proportional set sizes (each shared
    page counted once over all processes; a process whose PSS is unreadable adds its RSS),
    ``peak_rss`` sums resident sets (shared pages once per process, an overstatement).

    Samples come every ``interval`` seconds, or less often when a sample is slow: reading the
    PSS of a dozen Ray processes takes tens of milliseconds, and at 0.2 s that took a fifth of a
    core from the clients being measured. The pause after a sample is stretched so that sampling
    uses at most ``max_share`` of one core; a peak shorter than the pause can be missed."""

    def __init__(
        self,
        interval: float = 0.2,
        pids: Callable[[], list[int]] | None = None,
        max_share: float = 0.02,
    ) -> None:
        self.interval, self.pids, self._stop = interval, pids, threading.Event()
        self.max_share = max_share
        self.peak = self.peak_rss = 0.0

    def _processes(self) -> list[psutil.Process]:
        if self.pids is None:
            me = psutil.Process()
            return [me, *me.children(recursive=True)]
        found = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(pid))
        return found

    def _sample(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            pss = rss = 0.0
            for p in self._processes():
                with contextlib.suppress(psutil.Error):
                    resident = p.memory_info().rss / 2**20
                    proportional = pss_mib(p.pid)
                    rss += resident
                    pss += resident if proportional is None else proportional
            self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)
            spent = time.perf_counter() - start
            self._stop.wait(max(self.interval, spent * (1 / self.max_share - 1)))

    def __enter__(self) -> PeakTreeMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
