"""Differentiable siamese augmentation: one draw, the same transform on real and synthetic data."""

import pytest
import torch

from fedcl_dd.augment import DSA, FAMILIES


def _dsa(family: str, seed: int = 0) -> DSA:
    return DSA(family, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_draw_transforms_real_and_synthetic_alike(family):
    aug = _dsa(family)
    real = torch.randn(6, 3, 16, 16)
    syn = torch.randn(4, 3, 16, 16, requires_grad=True)
    syn.data[0] = real[2]  # a synthetic image equal to a real one must come out equal to it
    for _ in range(5):
        params = aug.sample(1)
        out_real, out_syn = aug.apply(real, params), aug.apply(syn, params)
        assert torch.allclose(out_real[2], out_syn[0], atol=1e-6)
        # Batch composition does not matter: applying to the union gives the same tensors.
        both = aug.apply(torch.cat([real, syn.detach()]), params)
        assert torch.allclose(both[:6], out_real, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "flip"])
def test_each_transform_changes_images_and_passes_gradients(family):
    aug = _dsa(family, seed=1)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    params = aug.sample(1)
    out = aug.apply(x, params)
    assert not torch.allclose(out, x)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_flip_mirrors_when_drawn():
    aug = _dsa("flip")
    x = torch.randn(1, 1, 4, 4)
    outs = [aug.apply(x, aug.sample(1)) for _ in range(20)]
    assert any(torch.equal(o, x.flip(3)) for o in outs) and any(torch.equal(o, x) for o in outs)


def test_draws_come_from_the_generator_only():
    state = torch.random.get_rng_state()
    a = [_dsa("color_crop_cutout_flip_scale_rotate", 7).sample(3) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched
    assert a[0].family == a[1].family
    for k in a[0].values:
        assert torch.equal(a[0].values[k], a[1].values[k])


def test_per_sample_mode_draws_one_transform_per_image():
    aug = _dsa("rotate")
    x = torch.ones(1, 1, 9, 9).repeat(8, 1, 1, 1)
    out = aug(x)
    assert len({tuple(o.flatten().round(decimals=4).tolist()) for o in out}) > 1


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation.*'blur'"):
        DSA("crop_blur")
