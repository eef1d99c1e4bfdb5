"""Recipes: one meaning of a method, a budget and an initialization everywhere."""

import warnings

import pytest
import torch

from fedcl_dd.recipe import Recipe
from fedcl_dd.synthetic import AddressingSet, PixelSet, bytes_per_image


def test_budget_of_n_images_gives_n_pixel_images_and_more_addressed_ones(digits, digits_sampler):
    gen = torch.Generator().manual_seed(0)
    pixels = Recipe(ipc=4).init_synthetic(digits_sampler, digits.spec, gen)
    addressing = Recipe(ipc=4, param="addressing").init_synthetic(digits_sampler, digits.spec, gen)
    budget = bytes_per_image(digits.spec.image_shape) * 4 * 10
    assert isinstance(pixels, PixelSet) and pixels.num_images == 40 and pixels.nbytes == budget
    assert isinstance(addressing, AddressingSet) and addressing.nbytes <= budget
    assert addressing.num_images > pixels.num_images


def test_a_subset_of_classes_gets_the_budget_of_those_classes(digits, digits_sampler):
    syn = Recipe(ipc=3).init_synthetic(
        digits_sampler, digits.spec, torch.Generator(), classes=[1, 7]
    )
    assert syn.classes == [1, 7] and syn.num_images == 6 and syn.num_classes == 10


@pytest.mark.filterwarnings("ignore:.*stores no pixels to clamp")  # the next test's subject
def test_private_sets_start_from_noise_and_never_from_real_data(digits, digits_sampler):
    recipe = Recipe(method="dm-dp", param="addressing", options={"noise_multiplier": 1.0})
    assert recipe.init == "noise"
    syn = recipe.init_synthetic(digits_sampler, digits.spec, torch.Generator().manual_seed(0))
    real = digits_sampler.x.flatten(1)
    nearest = torch.cdist(syn.images().detach().flatten(1), real).min(1).values
    assert nearest.min() > 1.0  # nothing is a copy or projection of a real image
    with pytest.raises(ValueError, match="would publish real images"):
        Recipe(method="dm-dp", init="real")


def test_a_clamping_method_on_a_set_it_cannot_clamp_is_warned_about():
    # dm-dp bounds its images by clamping stored pixels; an addressing memory stores none.
    with pytest.warns(UserWarning, match="stores no pixels to clamp"):
        Recipe(method="dm-dp", param="addressing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Recipe(method="dm-dp", param="multi")
        Recipe(method="dm", param="addressing")  # dm does not clamp: nothing to warn about


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "kip"}, "unknown method 'kip'"),
        ({"param": "voxels"}, "unknown parameterization"),
        ({"ipc": 0}, "images per class must be >= 1"),
        ({"storage": "int8"}, "unknown storage"),
        ({"budget_bytes": -5}, "budget_bytes must be positive"),
        (
            {"options": {"epsilon": 1.0}},
            "option epsilon does not apply to method 'dm'.*belongs to dm-dp",
        ),
        ({"options": {"bases": 4}}, "option bases does not apply.*belongs to addressing"),
        ({"options": {"warp": 4}}, "no registered method declares it"),
        ({"options": {"real_per_class": 0}}, r"real-per-class=0 is outside \[1"),
        ({"method": "gm", "options": {"distance": "l1"}}, "distance='l1' is not one of"),
    ],
)
def test_bad_recipes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


def test_published_learning_rates_are_the_defaults():
    assert Recipe(method="dm", ipc=10).lr == 1.0 and Recipe(method="dm", ipc=100).lr == 10.0
    assert Recipe(method="gm").lr == 0.1
    assert Recipe(method="tm", ipc=10).lr == 100.0 and Recipe(method="tm", ipc=50).lr == 1000.0
    assert Recipe(method="dm", lr_images=3.0).lr == 3.0
