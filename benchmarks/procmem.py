"""Peak resident memory of the current process (Linux), for the CPU memory figures of the benchmarks."""

from __future__ import annotations

from pathlib import Path


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
