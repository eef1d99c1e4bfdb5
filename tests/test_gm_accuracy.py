"""Gradient matching improves on its real start (its own module: it runs on two threads)."""

import pytest
import torch

from fedcl_dd.augment import DSA
from fedcl_dd.distill import DistillConfig, distill
from fedcl_dd.evaluate import evaluate
from fedcl_dd.objectives import GradientMatching, MatchingContext
from fedcl_dd.synthetic import PixelSet


@pytest.mark.slow
def test_gm_beats_its_random_real_start_at_5_images_per_class(digits16):
    spec, real, test_x, test_y = digits16
    gains = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        syn = PixelSet.from_real(real, 5, generator=gen)
        kw = {"num_models": 2, "epochs": 50, "seed": seed}  # the same networks before and after
        before = evaluate(syn, test_x, test_y, spec, **kw)
        ctx = MatchingContext(
            real,
            spec,
            augment=DSA(spec.dsa_strategy, torch.Generator().manual_seed(seed + 1)),
            generator=gen,
        )
        distill(
            syn, GradientMatching(real_per_class=32), ctx, DistillConfig(20, 0.1)
        )  # DC's image lr
        after = evaluate(syn, test_x, test_y, spec, **kw)
        gains.append(after.mean - before.mean)
    # Networks trained 50 epochs (not 300: the evaluations would take most of the test's time).
    # Measured after 20 iterations: 87.3% -> 91.2% (seed 0) and 87.9% -> 91.9% (seed 1); 40
    # iterations gave 91.9% and 92.7% in twice the time, and 100-epoch evaluations smaller gains.
    assert sum(gains) / len(gains) > 0.02, gains
