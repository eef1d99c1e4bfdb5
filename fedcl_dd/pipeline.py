"""One distillation run, assembled in one place: recipe + real data + spec + device + seed.

The command line, the Flower client, the continual memory and the benchmarks all build
their runs here, so the order of random draws, the augmentation and the defaults are the
same everywhere::

    run = Distillation(Recipe(method="dm", ipc=10), real, spec, seed=0)
    result = run.run([ProgressBar()])
    run.syn.save("synthetic.safetensors")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .augment import DSA
from .data import DatasetSpec
from .distill import Callback, DistillConfig, DistillResult, distill
from .objectives.base import MatchingContext, NetworkSource, PrivateRelease
from .privacy import PrivateRandom
from .recipe import Recipe
from .sampling import ClassSampler
from .synthetic import SyntheticSet
from .teacher import label_by_teacher, train_teacher

__all__ = ["Distillation"]


class Distillation:
    """Everything one run needs, built from a :class:`~fedcl_dd.recipe.Recipe`.

    :param real: the real data, per class, on ``device``.
    :param seed: seeds the run's generator (networks, real batches, initialization) and,
        with ``seed + 1``, the augmentation's. Give ``generator`` instead to draw everything,
        augmentation included, from a stream the caller keeps (a continual memory's).
    :param augment: DSA with the dataset's strategy (default) or none.
    :param syn: a set to continue from (warm start) instead of a new one from the recipe.
    :param classes: the classes of a new set (default: every class ``real`` holds).
    :param model: the network architecture the objective matches with.
    :param network_source: replaces fresh networks (e.g. FedDM's perturbed global model).
    :param planned_iterations: every S update of the whole run, if more than this one's
        (a private objective plans its noise for all of them).
    :param cache_dir: where costly artifacts (expert trajectories) are kept between runs.
    :param info: metadata stored with a new set.
    :param noise_source: the private draws of a private method (default: the objective's
        own, OS entropy); e.g. ``PrivateRandom(key, context)`` for runs only the key's holder
        can reproduce. Never derived from ``seed``.
    :param public: data you may disclose (e.g. a public data set of the same classes), which a
        private method's model pool may train on (``pool_data="public"``).
    :param precision: ``"fp32"`` or ``"bf16"`` (the loss under bfloat16 autocast where the
        device computes it natively; :class:`~fedcl_dd.distill.DistillConfig`).
    :param compile: a :mod:`fedcl_dd.compiled` mode to compile the matching networks'
        embeddings in (distribution-matching methods), or None (the default): eager.

    ``syn``, ``objective``, ``ctx`` and ``config`` are ready after construction (e.g. to
    restore an objective's state before :meth:`run`).
    """

    def __init__(
        self,
        recipe: Recipe,
        real: ClassSampler,
        spec: DatasetSpec,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        augment: bool = True,
        device: torch.device | str | None = None,
        syn: SyntheticSet | None = None,
        classes: list[int] | None = None,
        model: str = "convnet",
        network_source: NetworkSource | None = None,
        planned_iterations: int | None = None,
        cache_dir: str | Path | None = None,
        info: dict[str, Any] | None = None,
        noise_source: PrivateRandom | None = None,
        public: ClassSampler | None = None,
        precision: str = "fp32",
        compile: str | None = None,
    ) -> None:
        if (seed is None) == (generator is None):
            raise ValueError("give exactly one of seed or generator")
        self.recipe = recipe
        gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))  # type: ignore[arg-type]
        aug_gen = gen if seed is None else torch.Generator().manual_seed(int(seed) + 1)
        self.ctx = MatchingContext(
            real=real,
            spec=spec,
            model=model,
            augment=DSA(spec.dsa_strategy, aug_gen) if augment else None,
            generator=gen,
            device=torch.device(device) if device is not None else real.device,
            network_source=network_source,
            public=public,
        )
        if syn is None:
            syn = recipe.init_synthetic(real, spec, gen, classes=classes, info=info)
        self.syn = syn.to(self.ctx.device)
        self.objective = recipe.objective(planned_iterations, cache_dir)
        if noise_source is not None:
            if not isinstance(self.objective, PrivateRelease):
                raise ValueError(
                    f"noise_source is for private methods; {recipe.method!r} releases no noise"
                )
            self.objective.noise_source = noise_source
        self.config = DistillConfig(
            recipe.iterations,
            recipe.lr,
            float(recipe.momentum or 0.0),
            precision=precision,
            compile=compile,
        )

    def run(self, callbacks: Sequence[Callback] = ()) -> DistillResult:
        """Distill ``syn`` in place for the recipe's iterations (none: nothing is set up or run).

        A recipe with a teacher trains it first, on the run's clock: a time limit covers the
        teacher and the distillation together, and the result's seconds count both. The
        teacher then labels the distilled images.
        """
        teacher, spent = None, 0.0
        if self.recipe.teacher_epochs:
            start = time.perf_counter()
            teacher = train_teacher(
                self.ctx.real,
                self.ctx.spec,
                self.recipe.teacher_epochs,
                self.ctx.model,
                self.ctx.generator,
                self.ctx.device,
            )
            spent = time.perf_counter() - start
        if self.config.iterations == 0:
            result = DistillResult([], spent, 0, {}, self.objective.report())
        else:
            result = distill(self.syn, self.objective, self.ctx, self.config, callbacks, spent)
        if teacher is not None:
            start = time.perf_counter()
            label_by_teacher(self.syn, teacher)
            result.seconds += time.perf_counter() - start
            result.report["teacher_seconds"] = spent
        return result
