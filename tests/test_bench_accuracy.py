"""benchmarks/accuracy.py: which (parameterization, storage) cells a command runs, and how its
``--jobs`` processes start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from bench_scripts import BENCHMARKS, load_script

from fedcl_dd.allocator import has_glibc


@pytest.fixture(scope="module")
def bench():
    return load_script("accuracy")


def test_plain_params_run_at_every_storage_and_pinned_ones_at_theirs(bench):
    pairs = bench.param_storages(["pixels", "multi:fp16"], ["fp32", "fp16"])
    assert pairs == [("pixels", "fp32"), ("pixels", "fp16"), ("multi", "fp16")]
    # The reference (DM on fp32 pixels) beside one pinned cell, each once.
    assert bench.param_storages(["pixels", "multi:fp16", "multi:fp16"], ["fp32"]) == [
        ("pixels", "fp32"),
        ("multi", "fp16"),
    ]


def test_a_pinned_storage_that_does_not_exist_is_named_with_the_fix(bench):
    with pytest.raises(ValueError, match=r"'multi:bf8'.*storage 'bf8'.*multi:fp16"):
        bench.param_storages(["multi:bf8"], ["fp32"])


def test_a_teacher_labels_every_set_but_the_reference_and_is_named_in_its_targets(bench):
    cells = bench.make_cells([10], [("pixels", "fp32"), ("multi", "fp16")], ["dm"], 1)
    assert [(c.param, c.teacher) for c in cells] == [("pixels", 0), ("multi", 1)]
    row = {"dataset": "mnist", "ipc": 10, "seed": 0, "method": "dm", "lr_images": 10.0}
    reference = {**row, "param": "pixels", "storage": "fp32", "accuracy_mean": 0.96}
    taught = {**row, "param": "multi", "storage": "fp16", "accuracy_mean": 0.98}
    taught |= {"teacher_epochs": 1, "lr_selection": [{"lr_images": 10.0, "validation": 0.97}]}
    targets = {t["name"]: t for t in bench.accuracy_targets([reference, taught], 15, "cmd")}
    gain = targets["mnist-ipc10-15min-gain-over-dm-dm-multi-fp16-teacher"]
    assert gain["value"] == pytest.approx(0.02)
    assert targets["mnist-ipc10-15min-acc"]["value"] == 0.98  # the validated row speaks


WORKERS = """
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, sys.argv[1])
import accuracy
import torch
from fedcl_dd.allocator import freed_memory_kept

if __name__ == "__main__":
    with ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=accuracy._start_worker,
        initargs=(1,),
    ) as ex:
        print(ex.submit(torch.get_num_threads).result(), ex.submit(freed_memory_kept).result())
"""


def test_a_jobs_worker_runs_on_its_share_of_the_cores_with_freed_memory_kept(tmp_path):
    """A spawned --jobs process starts with torch's and glibc's defaults, not its parent's: it
    would take every core once its neighbour finished, and fault its tensors in anew."""
    script = tmp_path / "workers.py"
    script.write_text(WORKERS)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, str(script), str(BENCHMARKS)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    assert out == ["1", str(has_glibc())]
