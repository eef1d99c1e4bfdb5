"""Record-level DP: the accountant layer (fedcl_dd.privacy) and private DM (dm-dp)."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedcl_dd.augment import DSA
from fedcl_dd.distill import Checkpointer, DistillConfig, distill
from fedcl_dd.models import make_model
from fedcl_dd.objectives.base import MatchingContext, class_means
from fedcl_dd.objectives.dm_dp import PrivateDistributionMatching
from fedcl_dd.privacy import (
    PrivacyBudgetError,
    PrivacyLedger,
    PrivateRandom,
    epsilon_for,
    noise_for_target,
)
from fedcl_dd.sampling import ClassSampler
from fedcl_dd.synthetic import PixelSet

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")

DELTA = 1e-5
KEY = "a-client-held-secret-key"


# --------------------------------------------------------------------------- accountant layer


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    for sigma, q, n in history:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.05, 1000)],
        [(1.0, 0.01, 300), (2.0, 0.1, 50), (1.0, 0.01, 20)],
        [(4.5, 1.0, 40)],
    ],
)
def test_ledger_matches_opacus_and_survives_round_trips(history):
    ledger = PrivacyLedger()
    for sigma, q, n in history:
        ledger.step(sigma, q, num_steps=n)
    expected = _opacus_epsilon(history, DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    assert ledger.steps == sum(n for _, _, n in history)

    # JSON and torch's weights-only loader (what checkpoints use) both keep the total.
    as_json = PrivacyLedger()
    as_json.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    buf = io.BytesIO()
    torch.save({"ledger": ledger.state_dict()}, buf)
    buf.seek(0)
    as_torch = PrivacyLedger()
    as_torch.load_state_dict(torch.load(buf, weights_only=True)["ledger"])
    for restored in (as_json, as_torch):
        assert restored.history == ledger.history
        assert restored.epsilon(DELTA) == pytest.approx(expected, rel=1e-12)

    # A resumed ledger keeps counting: one more step matches Opacus with one more step.
    sigma, q, _ = history[-1]
    as_json.step(sigma, q)
    longer = [*history[:-1], (sigma, q, history[-1][2] + 1)]
    assert as_json.epsilon(DELTA) == pytest.approx(_opacus_epsilon(longer, DELTA), rel=1e-12)


def test_ledger_basics():
    ledger = PrivacyLedger()
    assert ledger.epsilon(DELTA) == 0.0 and ledger.steps == 0
    assert ledger.projected_epsilon(DELTA, 1.0, 0.1, 10) == pytest.approx(
        epsilon_for(1.0, 0.1, 10, DELTA)
    )
    assert ledger.steps == 0  # projecting records nothing
    with pytest.raises(ValueError, match="noise_multiplier"):
        ledger.step(0.0, 0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.step(1.0, 1.5)
    with pytest.raises(ValueError, match="lists"):
        ledger.load_state_dict({"history": []})


@pytest.mark.parametrize(
    "epsilon, q, steps",
    [(8.0, 0.05, 1000), (1.0, 0.01, 500), (8.0, 1.0, 50)],
)
def test_noise_for_target_meets_target_tightly(epsilon, q, steps):
    sigma = noise_for_target(epsilon, DELTA, q, steps)
    spent = epsilon_for(sigma, q, steps, DELTA)
    assert 0.99 * epsilon <= spent <= epsilon


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(target_epsilon=0.0), "epsilon"),
        (dict(target_epsilon=-1.0), "epsilon"),
        (dict(target_epsilon=math.inf), "epsilon"),
        (dict(target_epsilon=math.nan), "epsilon"),
        (dict(target_delta=0.0), "delta"),
        (dict(target_delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        # Below the RDP-to-DP conversion's floor (~0.10 at delta=1e-5): no noise reaches it.
        (dict(target_epsilon=0.05), "larger epsilon"),
    ],
)
def test_impossible_targets_raise_helpful_errors(kwargs, words):
    args = dict(target_epsilon=8.0, target_delta=DELTA, sample_rate=0.05, steps=100) | kwargs
    with pytest.raises(PrivacyBudgetError, match=words):
        noise_for_target(**args)


def test_objective_rejects_bad_settings():
    with pytest.raises(ValueError, match="exactly one"):
        PrivateDistributionMatching()
    with pytest.raises(ValueError, match="exactly one"):
        PrivateDistributionMatching(noise_multiplier=1.0, epsilon=1.0, iterations=10)
    with pytest.raises(ValueError, match="iterations"):
        PrivateDistributionMatching(epsilon=1.0)
    with pytest.raises(PrivacyBudgetError, match="larger epsilon"):
        PrivateDistributionMatching(epsilon=0.05, iterations=10, sample_rate=0.1)
    with pytest.raises(PrivacyBudgetError, match="delta"):
        PrivateDistributionMatching(noise_multiplier=1.0, delta=0.0)


# --------------------------------------------------------------------------- the release


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from fedcl_dd.data import load_dataset

    return load_dataset("digits")


def _ctx(ds, seed: int = 0, augment: bool = True, model: str = "convnet") -> MatchingContext:
    spec = ds.spec
    return MatchingContext(
        ClassSampler(ds.train_x, ds.train_y, spec.num_classes),
        spec,
        model=model,
        augment=DSA(spec.dsa_strategy, torch.Generator().manual_seed(seed)) if augment else None,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("model, scale", [("convnet", 1.0), ("mlp", 100.0)])
def test_clipped_sums_have_sensitivity_clip(digits, model, scale):
    """Adding or removing one record moves the vector of all class sums by at most C."""
    clip = 0.25
    ctx = _ctx(digits, model=model)
    obj = PrivateDistributionMatching(clip=clip, noise_multiplier=1.0, sample_rate=0.5)
    net = obj.network(ctx)
    net.center = torch.randn(
        net.inner.embed(digits.train_x[:1]).shape[1], generator=torch.Generator().manual_seed(1)
    )
    x, y = digits.train_x[:12] * scale, digits.train_y[:12]  # several records of several classes
    params = ctx.siamese()
    with torch.no_grad():
        raw = net.inner.embed(ctx.apply(x, params)) - net.center
    assert bool((raw.norm(dim=1) > 2 * clip).all()), (
        "records must be large enough for clipping to act"
    )

    full = obj.clipped_sums(ctx, net, x, y, params)
    extra_x, extra_y = digits.train_x[100:101] * scale, digits.train_y[100:101]
    neighbours = [
        (torch.cat([x[:i], x[i + 1 :]]), torch.cat([y[:i], y[i + 1 :]])) for i in range(len(x))
    ]
    neighbours.append((torch.cat([x, extra_x]), torch.cat([y, extra_y])))
    for nx, ny in neighbours:
        diff = obj.clipped_sums(ctx, net, nx, ny, params) - full
        assert (
            diff.norm(dim=1) > 1e-4 * clip
        ).sum() == 1  # one class's sum moves (the others: rounding only)
        assert float(diff.norm()) <= clip * (1 + 1e-5)
        assert float(diff.norm()) == pytest.approx(clip, rel=1e-4)  # clipping is active: exactly C

    # Each class sum is within (its records) x C, also when the network comes unwrapped.
    per_class = torch.bincount(y, minlength=10).to(full.dtype)
    for sums in (full, obj.clipped_sums(ctx, net.inner, x, y, params)):
        assert bool((sums.norm(dim=1) <= per_class * clip * (1 + 1e-5)).all())


def test_normalized_embeddings_have_norm_exactly_clip_and_the_same_sensitivity(digits):
    """normalize=True scales records far inside C up to C; one record still moves the sums by C."""
    clip = 1000.0  # far above any record's embedding norm: clipping alone would change nothing
    ctx = _ctx(digits)
    obj = PrivateDistributionMatching(
        clip=clip, normalize=True, noise_multiplier=1.0, sample_rate=0.5
    )
    net = obj.network(ctx)
    x, y = digits.train_x[:12], digits.train_y[:12]
    params = ctx.siamese()
    with torch.no_grad():
        raw = net.inner.embed(ctx.apply(x, params))
        rows = net.embed(ctx.apply(x, params))
    assert bool((raw.norm(dim=1) < clip / 10).all())
    torch.testing.assert_close(rows.norm(dim=1), torch.full((12,), clip))
    full = obj.clipped_sums(ctx, net, x, y, params)
    for i in range(len(x)):
        rest = torch.cat([x[:i], x[i + 1 :]]), torch.cat([y[:i], y[i + 1 :]])
        diff = obj.clipped_sums(ctx, net, *rest, params) - full
        assert float(diff.norm()) == pytest.approx(clip, rel=1e-4)


def test_batch_norm_networks_are_refused(digits):
    ctx = _ctx(digits, model="convnet-bn")
    obj = PrivateDistributionMatching(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="instance norm"):
        obj.clipped_sums(ctx, obj.network(ctx), digits.train_x[:4], digits.train_y[:4])


def test_release_adds_gaussian_noise_of_std_sigma_times_the_sensitivity_2c(digits):
    sigma, clip, classes = 2.0, 0.5, [1, 3, 5, 7]
    obj = PrivateDistributionMatching(clip=clip, noise_multiplier=sigma, sample_rate=1.0)
    obj.noise_source = PrivateRandom(KEY, "release")
    ctx, ctx2 = _ctx(digits, augment=False), _ctx(digits, augment=False)
    net = obj.network(ctx)
    means, stats = obj.release(ctx, net, classes, None)
    obj.noise_source = PrivateRandom(KEY, "release")  # same key and context: same draws
    again, _ = obj.release(ctx2, obj.network(ctx2), classes, None)
    assert torch.equal(means, again)
    assert obj.ledger.history == [(sigma, 1.0, 2)]

    counts = ctx.real.counts[classes].to(means.dtype).unsqueeze(1)  # q = 1: the whole class
    sums = obj.clipped_sums(ctx, net, digits.train_x, digits.train_y)
    noise = means[classes] * counts - sums[classes]
    std = sigma * 2 * clip
    assert stats["records"] == float(counts.sum()) and stats["noise_std"] == std
    assert float(noise.std()) == pytest.approx(std, rel=0.1)
    assert abs(float(noise.mean())) < 0.1 * std
    others = [c for c in range(10) if c not in classes]
    assert bool((means[others] == 0).all())


def test_a_release_cannot_be_replayed_from_the_servers_inputs(digits):
    """Every input a federated server knows (data seed, network seed, augmentation seed) is
    the same in both runs; on an all-zero dataset the clipped sums are known too. With the
    default noise source the noise still differs, so the server cannot subtract it."""
    zero = dataclasses.replace(digits, train_x=torch.zeros_like(digits.train_x))
    releases = []
    for _ in range(2):
        obj = PrivateDistributionMatching(clip=1.0, noise_multiplier=1.0, sample_rate=0.5)
        ctx = _ctx(zero, augment=False)
        releases.append(obj.release(ctx, obj.network(ctx), [0, 1], None)[0])
    assert not obj.noise_source.reproducible
    assert not torch.allclose(releases[0], releases[1])
    # The same with a key the server does not hold: another key, another release.
    keyed = []
    for key in (KEY, KEY + "-other"):
        obj = PrivateDistributionMatching(clip=1.0, noise_multiplier=1.0, sample_rate=0.5)
        obj.noise_source = PrivateRandom(key, "round 1")
        ctx = _ctx(zero, augment=False)
        keyed.append(obj.release(ctx, obj.network(ctx), [0, 1], None)[0])
    assert not torch.allclose(keyed[0], keyed[1])


def test_private_random_draws_are_standard_normal_and_refuse_short_keys():
    z = PrivateRandom().normal(200_000)
    assert z.dtype == torch.float64
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(1.0, abs=0.01)
    u = PrivateRandom(KEY).uniform(100_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    # A stream's state carries over: b, loaded with a's state after a drew, draws what a
    # draws next (not what a fresh stream of the same key would).
    a, b = PrivateRandom(KEY, "x"), PrivateRandom(KEY, "x")
    first = a.normal(7)
    b.load_state_dict(a.state_dict())
    following = a.normal(5)
    assert torch.equal(b.normal(5), following)
    assert not torch.equal(following, first[:5])
    with pytest.raises(ValueError, match="at least 16"):
        PrivateRandom("short")


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("q", [0.01, 0.2, 0.9])
def test_substitution_is_bounded_by_the_accounted_mechanism(sigma, q):
    """Replacing a record moves the sum by a and b (norms <= C) on either side; the worst
    pair, a = -b, is the mixtures (1-q)N(0) + qN(+-C). Its Renyi divergence stays below
    the add/remove subsampled Gaussian with sensitivity 2C, which the ledger accounts
    (units of C, noise std sigma * 2C, integrated on a fine grid)."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    x = np.linspace(-80, 80, 200_001)
    # The noise the objective adds, in units of C: sigma times its sensitivity (2C for
    # same-class replacement); a change to either shows here.
    obj = PrivateDistributionMatching(clip=0.5, noise_multiplier=sigma)
    s = sigma * obj.sensitivity / obj.clip
    assert s == pytest.approx(2 * sigma)

    def mix(mu: float) -> np.ndarray:
        return np.logaddexp(np.log1p(-q) + norm.logpdf(x, 0, s), np.log(q) + norm.logpdf(x, mu, s))

    def renyi(lp: np.ndarray, lq: np.ndarray, alpha: float) -> float:
        return float(logsumexp(alpha * lp + (1 - alpha) * lq + np.log(x[1] - x[0])) / (alpha - 1))

    for alpha in (2, 8, 32):
        sub = max(renyi(mix(1), mix(-1), alpha), renyi(mix(-1), mix(1), alpha))
        accounted = max(
            renyi(mix(2), norm.logpdf(x, 0, s), alpha), renyi(norm.logpdf(x, 0, s), mix(2), alpha)
        )
        assert sub <= accounted * (1 + 1e-6) + 1e-12, (alpha, sub, accounted)


def test_empty_poisson_draw_still_releases_noise(digits):
    obj = PrivateDistributionMatching(noise_multiplier=1.0, sample_rate=1e-6)
    ctx = _ctx(digits)
    ctx.augment = DSA("crop", torch.Generator().manual_seed(0))  # affine: rejects empty batches
    means, stats = obj.release(ctx, obj.network(ctx), [0, 1], ctx.siamese())
    assert (
        stats["records"] == 0 and bool(torch.isfinite(means).all()) and bool((means[:2] != 0).any())
    )


# --------------------------------------------------------------------------- distillation


def _dm_distance(syn: PixelSet, ds, nets: list[torch.nn.Module]) -> float:
    """Non-private DM distance between real and synthetic class means under held-out networks."""
    total = 0.0
    with torch.no_grad():
        for net in nets:
            real, _ = class_means(net.embed(ds.train_x), ds.train_y, 10)
            fake, _ = class_means(net.embed(syn.images()), syn.class_ids, 10)
            total += float(((real - fake) ** 2).sum())
    return total / len(nets)


def test_private_distillation_on_digits_learns(digits):
    ctx = _ctx(digits)
    spec = digits.spec
    syn = PixelSet.from_noise(10, spec.image_shape, 3, generator=torch.Generator().manual_seed(0))
    nets = [
        make_model("convnet", 1, 10, 8, torch.Generator().manual_seed(100 + i)) for i in range(3)
    ]
    before = _dm_distance(syn, digits, nets)
    # Centred embeddings have norm ~0.36 here: C = 0.3 clips most records; noise of std 0.3
    # (sigma = 0.5 at sensitivity 2C) at q = 0.1 over 30 iterations spends epsilon 21 (delta
    # 1e-5): a test of learning under noise, not a recommended budget.
    obj = PrivateDistributionMatching(clip=0.3, noise_multiplier=0.5, sample_rate=0.1)
    obj.noise_source = PrivateRandom(KEY, "learns")
    result = distill(syn, obj, ctx, DistillConfig(iterations=30, lr_images=100.0))
    after = _dm_distance(syn, digits, nets)
    losses = result.losses
    assert sum(losses[-10:]) < sum(losses[:10])
    assert after < 0.9 * before
    assert obj.ledger.steps == 30
    assert result.report["epsilon"] == pytest.approx(epsilon_for(0.5, 0.1, 30, DELTA))
    assert set(result.report) == {"epsilon", "delta", "sigma"}


def test_epsilon_target_is_respected_and_survives_resume(digits, tmp_path):
    target, iterations = 4.0, 6
    spec = digits.spec

    def run(until: int, callbacks=()):
        obj = PrivateDistributionMatching(clip=0.5, epsilon=target, iterations=iterations)
        obj.noise_source = PrivateRandom(KEY, "resume")  # reproducible, so resumed == whole
        syn = PixelSet.from_noise(
            10, spec.image_shape, 1, generator=torch.Generator().manual_seed(0)
        )
        ctx = _ctx(digits)
        distill(syn, obj, ctx, DistillConfig(iterations=until, lr_images=10.0), callbacks)
        return obj, syn, ctx

    full, full_syn, ctx = run(iterations)
    assert full.sample_rate == 1.0  # default: 256 / ~135 records per class, capped at 1
    assert full.ledger.steps == iterations
    assert full.report()["epsilon"] <= target
    assert full.report()["epsilon"] >= 0.99 * target
    with pytest.raises(PrivacyBudgetError, match="spent"):  # one release beyond the plan
        full.release(ctx, full.network(ctx), [0, 1], None)

    ckpt = tmp_path / "half.pt"
    run(iterations // 2, callbacks=[Checkpointer(ckpt, every=0)])
    resumed, resumed_syn, _ = run(iterations, callbacks=[Checkpointer(ckpt, every=0, resume=True)])
    assert resumed.ledger.history == full.ledger.history
    assert resumed.report() == full.report()
    assert torch.allclose(resumed_syn.images(), full_syn.images())


def test_private_images_stay_within_the_data_pixel_range(digits):
    # Noisy targets pull images without bound; dm-dp clamps them to where real pixels lie
    # after every step (post-processing: no privacy spent), so servers accept its uploads.
    ctx = _ctx(digits)
    syn = PixelSet.from_noise(
        10, digits.spec.image_shape, 2, generator=torch.Generator().manual_seed(0)
    )
    low, high = digits.spec.pixel_bounds()
    assert syn.images().max() > high.max()  # the noise start lies outside: projection must act
    obj = PrivateDistributionMatching(clip=1.0, noise_multiplier=2.0, sample_rate=0.1)
    obj.noise_source = PrivateRandom(KEY, "bounds")
    distill(syn, obj, ctx, DistillConfig(iterations=10, lr_images=100.0))
    x = syn.images().detach()
    assert low.min() <= x.min() and x.max() <= high.max()
    assert (x == high.max()).any()  # images pressed against the bound: what unclamped noise does
