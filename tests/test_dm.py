"""Distribution matching: the batched loss is the paper's, it falls, and it beats its real start."""

import statistics

import pytest
import torch

from fedcl_dd.augment import DSA
from fedcl_dd.distill import DistillConfig, distill
from fedcl_dd.evaluate import evaluate
from fedcl_dd.objectives import DistributionMatching, MatchingContext
from fedcl_dd.recipe import Recipe


def _ctx(digits, sampler, seed, augment=True):
    aug = (
        DSA(digits.spec.dsa_strategy, torch.Generator().manual_seed(seed + 1)) if augment else None
    )
    return MatchingContext(
        sampler, digits.spec, augment=aug, generator=torch.Generator().manual_seed(seed)
    )


def test_batched_loss_equals_the_per_class_sum_of_the_paper(digits, digits_sampler):
    ctx = _ctx(digits, digits_sampler, 0, augment=False)
    syn = Recipe(ipc=3).init_synthetic(
        digits_sampler, digits.spec, torch.Generator().manual_seed(0)
    )
    dm = DistributionMatching(real_per_class=20)
    net = dm.network(ctx)
    state = ctx.generator.get_state()
    batched = dm.loss(ctx, net, syn)
    ctx.generator.set_state(state)  # same real draws for the per-class reference
    real_x, real_y = digits_sampler.sample_classes(syn.classes, 20, ctx.generator)
    images = syn.images()
    looped = sum(
        (
            (net.embed(real_x[real_y == c]).mean(0) - net.embed(images[syn.class_ids == c]).mean(0))
            ** 2
        ).sum()
        for c in syn.classes
    )
    assert torch.allclose(batched, looped, rtol=1e-4)


def test_loss_falls_on_digits(digits, digits_sampler):
    syn = Recipe(ipc=5).init_synthetic(
        digits_sampler, digits.spec, torch.Generator().manual_seed(0)
    )
    result = distill(
        syn, DistributionMatching(64), _ctx(digits, digits_sampler, 0), DistillConfig(60, 10.0)
    )
    first, last = statistics.fmean(result.losses[:10]), statistics.fmean(result.losses[-10:])
    assert last < 0.8 * first, (first, last)


@pytest.mark.slow  # about two minutes on one thread
def test_dm_beats_its_random_real_start_at_5_images_per_class(digits, digits_sampler):
    gains = []
    for seed in (0, 1):
        syn = Recipe(ipc=5).init_synthetic(
            digits_sampler, digits.spec, torch.Generator().manual_seed(seed)
        )
        kw = {"num_models": 2, "epochs": 100, "seed": seed}  # 100 epochs: half the test's time
        before = evaluate(syn, digits.test_x, digits.test_y, digits.spec, **kw)
        distill(
            syn,
            DistributionMatching(64),
            _ctx(digits, digits_sampler, seed),
            DistillConfig(75, 10.0),
        )
        after = evaluate(syn, digits.test_x, digits.test_y, digits.spec, **kw)
        gains.append(after.mean - before.mean)
    # Measured: 83.7% -> 88.6% (seed 0), 84.9% -> 87.9% (seed 1); 150 iterations gave 88.7% and
    # 88.0%, in twice the time.
    assert statistics.fmean(gains) > 0.02, gains


def test_syn_per_class_matches_a_drawn_subset_and_builds_only_its_images(
    digits, digits_sampler, monkeypatch
):
    from fedcl_dd.synthetic import AddressingSet

    recipe = Recipe(param="addressing", ipc=5, options={"downsample": 1})
    syn = recipe.init_synthetic(digits_sampler, digits.spec, torch.Generator().manual_seed(0))
    assert isinstance(syn, AddressingSet) and syn.per_class > 3

    def whole_set(self):
        raise AssertionError("the whole addressing set was built")

    monkeypatch.setattr(AddressingSet, "images", whole_set)
    ctx = _ctx(digits, digits_sampler, 0)
    dm = DistributionMatching(real_per_class=16, syn_per_class=3)
    images, ids, targets = dm.synthetic_batch(ctx, syn)
    assert torch.equal(torch.bincount(ids, minlength=10), torch.full((10,), 3))
    assert images.shape[0] == 30 and torch.equal(targets, ids)
    dm.loss(ctx, dm.network(ctx), syn).backward()
    # Only the drawn address rows (3 of each class's per_class) receive a gradient.
    touched = (syn.addresses.grad.abs().sum(-1) > 0).sum(0)
    assert torch.equal(touched, torch.full((10,), 3))


def test_syn_per_class_at_or_above_the_class_size_is_the_whole_set(digits, digits_sampler):
    syn = Recipe(ipc=2).init_synthetic(
        digits_sampler, digits.spec, torch.Generator().manual_seed(0)
    )
    ctx = _ctx(digits, digits_sampler, 0)
    state = ctx.generator.get_state()
    images, ids, _ = DistributionMatching(syn_per_class=2).synthetic_batch(ctx, syn)
    assert torch.equal(images, syn.images()) and torch.equal(ids, syn.class_ids)
    assert torch.equal(ctx.generator.get_state(), state)  # nothing drawn: runs stay as before
