"""Multi-formation pixel sets (IDC): honest bytes, exact round trips, and the sub-images they
are built from."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedcl_dd.recipe import Recipe
from fedcl_dd.synthetic import MultiFormationSet, SyntheticSet, bytes_per_image


def test_the_same_bytes_replay_factor_squared_images(digits, digits_sampler):
    pixels = Recipe(ipc=2).init_synthetic(digits_sampler, digits.spec, torch.Generator())
    multi = Recipe(ipc=2, param="multi", options={"factor": 2}).init_synthetic(
        digits_sampler, digits.spec, torch.Generator()
    )
    assert isinstance(multi, MultiFormationSet)
    assert multi.nbytes == pixels.nbytes == 20 * bytes_per_image(digits.spec.image_shape)
    assert multi.num_images == 4 * pixels.num_images == 80
    assert multi.images().shape == (80, *digits.spec.image_shape)
    assert multi.class_ids.bincount(minlength=10).tolist() == [8] * 10


def test_sub_images_are_the_real_images_at_a_quarter_of_the_pixels(digits, digits_sampler):
    gen = torch.Generator().manual_seed(3)
    multi = MultiFormationSet.tiled_from_real(digits_sampler, 1, 2, [4], gen)
    picked = digits_sampler.sample(4, 4, torch.Generator().manual_seed(3))
    expected = F.interpolate(F.avg_pool2d(picked, 2), size=(8, 8), mode="bilinear")
    assert torch.allclose(multi.images(), expected, atol=1e-6)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_round_trip_is_exact(digits, digits_sampler, tmp_path, factor):
    syn = Recipe(ipc=1, param="multi", options={"factor": factor}).init_synthetic(
        digits_sampler, digits.spec, torch.Generator()
    )
    again = SyntheticSet.load(syn.save(tmp_path / "m.safetensors"))
    assert isinstance(again, MultiFormationSet) and again.factor == factor
    assert torch.equal(again.images(), syn.images().detach())


def test_a_factor_that_does_not_divide_the_image_is_refused(digits, digits_sampler):
    with pytest.raises(ValueError, match="factor 3 must divide"):
        Recipe(ipc=1, param="multi", options={"factor": 3}).init_synthetic(
            digits_sampler, digits.spec, torch.Generator()
        )


def test_a_multi_formation_upload_is_admitted_by_the_server(digits, digits_sampler):
    pytest.importorskip("flwr")
    from fedcl_dd.strategies.flower.config import FedConfig
    from fedcl_dd.strategies.flower.payload import synthetic_records
    from fedcl_dd.strategies.flower.strategy import SyntheticSetStrategy

    cfg = FedConfig(preset="digits-iid-4", param="multi", ipc=2, options={"factor": 2})
    syn = cfg.recipe().init_synthetic(digits_sampler, digits.spec, torch.Generator())
    metrics = {"num-examples": 100, "partition-id": 1, "seconds": 1.0}
    up = SyntheticSetStrategy(cfg).admit(synthetic_records(syn, metrics))
    assert isinstance(up.syn, MultiFormationSet) and up.syn.num_images == 80
    assert up.nbytes == syn.nbytes


@pytest.mark.parametrize(
    "param,options", [("pixels", {}), ("multi", {"factor": 2}), ("addressing", {})]
)
def test_images_at_builds_exactly_the_images_asked_for(digits, digits_sampler, param, options):
    syn = Recipe(ipc=3, param=param, options=options).init_synthetic(
        digits_sampler, digits.spec, torch.Generator()
    )
    index = torch.tensor([0, 5, syn.num_images - 1, 2])
    with torch.no_grad():
        assert torch.allclose(syn.images_at(index), syn.images()[index], atol=1e-6)
