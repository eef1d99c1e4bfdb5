"""benchmarks/procmem.py: the peak-memory sampler must not take the CPU it is measuring."""

from __future__ import annotations

import os
import time
from types import ModuleType

import pytest
from bench_scripts import load_script


@pytest.fixture(scope="module")
def procmem() -> ModuleType:
    return load_script("procmem")


def test_slow_samples_are_spaced_to_keep_the_sampler_share(procmem: ModuleType) -> None:
    """A sample that takes 20 ms, with max_share 0.1, is followed by a pause of >= 180 ms:
    at most ~6 samples in a second, where a fixed 1 ms interval would take ~48."""
    calls = []

    def slow_pids() -> list[int]:
        calls.append(time.perf_counter())
        time.sleep(0.02)
        return [os.getpid()]

    with procmem.PeakTreeMemory(interval=0.001, pids=slow_pids, max_share=0.1) as mem:
        time.sleep(1.0)
    assert 1 <= len(calls) <= 7, len(calls)
    assert mem.peak > 0 and mem.peak_rss >= mem.peak * 0.5


def test_peak_is_this_process_memory(procmem: ModuleType) -> None:
    """Without ``pids``, the sampled tree is this process (and its children): the peak resident
    set is this process's, in MiB."""
    with procmem.PeakTreeMemory(interval=0.05) as mem:
        time.sleep(0.5)
    rss = procmem.status_mib("VmRSS")
    assert 0.3 * rss < mem.peak_rss < 3 * rss
