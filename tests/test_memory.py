"""The byte-bounded memory of the core: herding, the budget through growth and shrinking,
and its independence from the frameworks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcl_dd.memory import (
    AddressingMemory,
    MultiFormationMemory,
    PixelMemory,
    herding_order,
    memory_for,
)
from fedcl_dd.synthetic import bytes_per_image

FAST = {"iterations": 2, "real_per_class": 16, "augment": False}


def _by_class(data, classes):
    keep = torch.isin(data.train_y, torch.tensor(classes))
    return data.train_x[keep], data.train_y[keep]


def test_the_core_imports_no_framework():
    """Every core module loads without Flower or Avalanche (the dependency points one way)."""
    code = (
        "import importlib, pkgutil, sys, fedcl_dd\n"
        "for m in pkgutil.walk_packages(fedcl_dd.__path__, 'fedcl_dd.'):\n"
        "    if not m.name.startswith(('fedcl_dd.strategies', 'fedcl_dd.scenarios')):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'flwr', 'avalanche'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_herding_keeps_the_running_mean_closest(n, dim, seed):
    """Each pick is the row that brings the mean of the chosen closest to the mean of all
    (checked by brute force), and the order is a permutation."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    order = herding_order(x)
    assert sorted(order.tolist()) == list(range(n))
    target, chosen = x.mean(0), []
    for pick in order.tolist():
        rest = [i for i in range(n) if i not in chosen]
        dist = {i: float((x[[*chosen, i]].mean(0) - target).pow(2).sum()) for i in rest}
        assert dist[pick] <= min(dist.values()) + 1e-5
        chosen.append(pick)


def test_herding_matches_avalanches_selection():
    pytest.importorskip("avalanche")
    from avalanche.training.storage_policy import HerdingSelectionStrategy

    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    theirs = HerdingSelectionStrategy(torch.nn.Identity(), "").make_sorted_indices_from_features(x)
    assert herding_order(x, 15).tolist() == list(theirs[:15])


@pytest.mark.parametrize("kind", [PixelMemory, AddressingMemory, MultiFormationMemory])
def test_memory_stays_within_its_bytes_as_classes_arrive(kind, digits):
    budget = 30 * bytes_per_image(digits.spec.image_shape)
    memory = kind(budget, digits.spec, **FAST)
    for group in ([0, 1], [2, 3], [4, 5, 6]):
        memory.add(*_by_class(digits, group))
        assert memory.nbytes <= budget
    assert memory.classes == list(range(7)) and len(memory.build_seconds) == 3
    assert memory.syn is not None and torch.isfinite(memory.syn.images()).all()


def test_pixel_memory_shrinks_by_herding_and_refuses_too_small(digits):
    image = bytes_per_image(digits.spec.image_shape)
    memory = PixelMemory(40 * image, digits.spec, **FAST)
    memory.add(*_by_class(digits, [0, 1]))
    before = memory.syn
    with pytest.raises(ValueError, match="too small"):
        memory.shrink(1)
    assert memory.syn is before and memory.budget_bytes == 40 * image
    memory.shrink(10)
    assert memory.syn is not None and memory.syn.num_images == 10 and memory.nbytes <= 10 * image


def test_memory_for_names_what_exists():
    assert memory_for("pixels") is PixelMemory and memory_for("addressing") is AddressingMemory
    with pytest.raises(ValueError, match="unknown parameterization .*'pixels'"):
        memory_for("no-such-parameterization")


def test_a_multi_formation_memory_replays_four_times_the_pixel_memorys_images(digits):
    budget = 30 * bytes_per_image(digits.spec.image_shape)
    pixels, multi = (
        PixelMemory(budget, digits.spec, **FAST),
        MultiFormationMemory(budget, digits.spec, **FAST),
    )
    for memory in (pixels, multi):
        memory.add(*_by_class(digits, [0, 1, 2]))
        memory.add(*_by_class(digits, [3, 4]))
    assert pixels.nbytes == multi.nbytes <= budget
    assert multi.syn.num_images == 4 * pixels.syn.num_images
    assert multi.max_samples() == 4 * pixels.max_samples()
    assert memory_for("multi") is MultiFormationMemory


def test_the_addressing_memory_is_distilled_by_default_with_its_dm_settings(digits):
    """By default an update runs 20 DM iterations at the memory's validated settings, so the
    stored set differs from its initialization alone; another method keeps its own defaults."""
    budget = 30 * bytes_per_image(digits.spec.image_shape)
    default = AddressingMemory(budget, digits.spec)
    recipe = default.recipe
    assert recipe.method == "dm" and recipe.iterations == 20 and recipe.lr == 10.0
    assert recipe.options["real_per_class"] == 16 and recipe.options["syn_per_class"] == 16
    init_only = AddressingMemory(budget, digits.spec, iterations=0)
    for memory in (default, init_only):
        memory.add(*_by_class(digits, [0, 1]))
    assert default.syn is not None and init_only.syn is not None
    assert not torch.equal(default.syn.images(), init_only.syn.images())
    ncfm = AddressingMemory(budget, digits.spec, method="ncfm").recipe
    assert ncfm.lr != 10.0 and ncfm.options.get("real_per_class", 64) != 16


@pytest.mark.parametrize("kind", [PixelMemory, AddressingMemory])
def test_an_update_stops_matching_when_its_seconds_run_out(kind, digits):
    """``seconds`` caps an update: at 0 it runs one matching iteration of the 10,000 asked
    (without the cap this test would not finish), and the count is recorded per update; an
    uncapped update runs them all."""
    budget = 20 * bytes_per_image(digits.spec.image_shape)
    memory = kind(budget, digits.spec, **{**FAST, "iterations": 10_000})
    memory.add(*_by_class(digits, [0, 1]), seconds=0.0)
    assert memory.iterations_run == [1]
    uncapped = kind(budget, digits.spec, **FAST)
    uncapped.add(*_by_class(digits, [0, 1]))
    assert uncapped.iterations_run == [FAST["iterations"]]


def test_a_negative_cap_is_refused_and_the_memory_kept(digits):
    memory = PixelMemory(20 * bytes_per_image(digits.spec.image_shape), digits.spec, **FAST)
    memory.add(*_by_class(digits, [0, 1]))
    before = memory.syn.images().clone()
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        memory.add(*_by_class(digits, [2, 3]), seconds=-1.0)
    assert memory.classes == [0, 1] and torch.equal(memory.syn.images(), before)
    assert memory.iterations_run == [FAST["iterations"]]
