"""What a benchmark ran on, recorded beside its figures (seconds mean little without it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from fedcl_dd.allocator import freed_memory_kept
from fedcl_dd.precision import bf16_unsupported_reason


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The CPU, its cores, this process's torch threads, whether bfloat16 runs natively on
    the CPU (a ``bf16`` run elsewhere fell back to fp32), the GPU if any, torch's version, and
    whether freed memory is kept for reuse (:mod:`fedcl_dd.allocator`: large steps run faster)."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16_cpu": bf16_unsupported_reason("cpu") is None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "freed_memory_kept": freed_memory_kept(),
    }
