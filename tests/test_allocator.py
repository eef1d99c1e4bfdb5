"""fedcl_dd.allocator: with freed memory kept, a large tensor reuses pages instead of faulting
fresh ones (the cost it removes), and the flag benchmarks record says whether it took effect."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Runs in its own process: the setting is process-wide and cannot be undone.
SCRIPT = """
import resource
import torch
from fedcl_dd.allocator import freed_memory_kept, keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, written and freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
flag_before = freed_memory_kept()
took = keep_freed_memory()
faults()  # the heap grows once
print(default, faults(), flag_before, took, freed_memory_kept())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_kept_memory_is_reused_without_page_faults() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split()
    default, kept, flag_before, took, flag_after = out
    # 64 MiB is 16,384 pages of 4 KiB: glibc unmaps the tensor on free and faults it in again.
    assert int(default) > 8000
    assert int(kept) < 500
    assert (flag_before, took, flag_after) == ("False", "True", "True")
