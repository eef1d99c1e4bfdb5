"""The poisoning screen: honest digits uploads pass, poisoned ones are refused with the reason."""

from __future__ import annotations

import math

import pytest
import torch
from fedcl_dd.scenarios.federated import client_data, parse_preset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcl_dd.models import make_model
from fedcl_dd.pipeline import Distillation
from fedcl_dd.recipe import Recipe
from fedcl_dd.sampling import ClassSampler
from fedcl_dd.screen import screen_sets
from fedcl_dd.synthetic import PixelSet

# One worker builds the `honest` sets for the whole module (xdist would build them per worker).
pytestmark = pytest.mark.xdist_group("screen")

PRESET = parse_preset("digits-dir0.5-10", seed=42)
SPEC = PRESET.spec


@pytest.fixture(scope="module")
def honest() -> dict[int, PixelSet]:
    """Each non-IID digits client's set after 20 DM iterations."""
    sets = {}
    for pid in range(PRESET.num_clients):
        data = client_data(PRESET, pid)
        real = ClassSampler(data.train_x, data.train_y, SPEC.num_classes)
        run = Distillation(Recipe(method="dm", ipc=10, iterations=20), real, SPEC, seed=pid)
        run.run()
        sets[pid] = run.syn
    return sets


def _net(seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    return make_model("convnet", SPEC.channels, SPEC.num_classes, SPEC.image_size, gen)


def _poisoned(syn: PixelSet, kind: str) -> PixelSet:
    with torch.no_grad():
        x, y = syn.images().clone(), syn.targets().clone()
    if kind == "permuted":
        y = (y + 1) % SPEC.num_classes
    elif kind == "scaled":
        x = x * 10
    else:  # images that are not digits at all
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return PixelSet(x, y, SPEC.num_classes)


def test_honest_uploads_pass(honest):
    for seed in range(3):
        result = screen_sets(honest, _net(seed))
        assert result.refused == {}
        assert all(score >= 0.5 for score in result.scores.values())


@pytest.mark.parametrize("kind", ["permuted", "scaled", "foreign"])
def test_two_poisoned_uploads_of_ten_are_refused_and_only_they(honest, kind):
    sets = dict(honest)
    for pid in (3, 7):
        sets[pid] = _poisoned(honest[pid], kind)
    result = screen_sets(sets, _net())
    assert sorted(result.refused) == [3, 7]
    assert all(reason.startswith("screened out") for reason in result.refused.values())


def test_a_set_without_peers_is_scored_nan_and_kept(honest):
    result = screen_sets({0: honest[0]}, _net())
    assert math.isnan(result.scores[0]) and result.refused == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"magnitude": 1.0}, "magnitude"),
        ({"min_peers": 0}, "min_peers"),
    ],
)
def test_bad_settings_are_refused(honest, kwargs, match):
    with pytest.raises(ValueError, match=match):
        screen_sets(honest, _net(), **kwargs)


@st.composite
def _sets(draw: st.DrawFn) -> dict[int, PixelSet]:
    n = draw(st.integers(1, 5))
    out = {}
    for key in range(n):
        k = draw(st.integers(1, 6))
        labels = torch.tensor(draw(st.lists(st.integers(0, 9), min_size=k, max_size=k)))
        scale = draw(st.sampled_from([0.0, 1e-6, 1.0, 100.0]))
        images = torch.randn((k, *SPEC.image_shape), generator=torch.Generator().manual_seed(key))
        out[key] = PixelSet(images * scale, labels, SPEC.num_classes)
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sets=_sets())
def test_the_screen_scores_any_finite_sets_without_raising(sets):
    result = screen_sets(sets, _net())
    assert set(result.scores) == set(sets) and set(result.refused) <= set(sets)
    for key, score in result.scores.items():
        assert math.isnan(score) or 0.0 <= score <= 1.0
        # Refused exactly when scored below the threshold (a magnitude refusal scores 0).
        assert (key in result.refused) == (not math.isnan(score) and score < 0.5)
    # The order in which sets arrive changes nothing.
    again = screen_sets(dict(reversed(list(sets.items()))), _net())
    assert again.refused.keys() == result.refused.keys()
