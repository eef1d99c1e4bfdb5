"""benchmarks/accuracy.py: which (parameterization, storage) cells a command runs."""

from __future__ import annotations

import pytest
from bench_scripts import load_script


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
