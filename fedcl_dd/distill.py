"""The one distillation loop every objective shares (the survey's Algorithm 1).

::

    initialize S
    repeat for each iteration:
        net <- objective.network(ctx)            # fresh, or from a pool (experts, global model)
        for each outer step:
            loss <- objective.loss(ctx, net, S); update S by SGD
            objective.update_network(ctx, net, S)   # gradient matching trains net on S

Callbacks see every iteration (progress bars, periodic evaluation, checkpoints).
A checkpoint holds S, the optimizer, the objective's state and every RNG state,
so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .io import atomic_write
from .objectives.base import DistillationDiverged, MatchingContext, Objective
from .synthetic import SyntheticSet

__all__ = [
    "DistillConfig",
    "DistillState",
    "DistillResult",
    "DistillationDiverged",
    "Callback",
    "ProgressBar",
    "PeriodicEvaluation",
    "Checkpointer",
    "TimeLimit",
    "distill",
]


@dataclass
class DistillConfig:
    """Optimizer and schedule for S: SGD with momentum, as in DC/DSA/DM."""

    iterations: int = 1000
    lr_images: float = 1.0
    momentum: float = 0.5
    lr_labels: float = 1.0

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.lr_images > 0:
            raise ValueError(f"lr_images must be > 0, got {self.lr_images}")


@dataclass
class DistillState:
    """What callbacks see: the iteration just finished and the history so far."""

    iteration: int
    syn: SyntheticSet
    objective: Objective
    loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stop: bool = False  # a callback sets this to end the run after the current iteration


@dataclass
class DistillResult:
    """Outcome of :func:`distill`: loss per iteration, logged metrics, time spent."""

    losses: list[float]
    seconds: float
    iterations: int
    metrics: dict[str, list[tuple[int, float]]]
    report: dict[str, float]


class Callback:
    """Hooks called by :func:`distill`; override what you need."""

    def on_start(self, state: DistillState, total: int) -> None: ...

    def on_iteration(self, state: DistillState) -> None: ...

    def on_end(self, state: DistillState) -> None: ...


class ProgressBar(Callback):
    """A tqdm progress bar showing the loss and the objective's report (e.g. epsilon)."""

    def __init__(self, desc: str = "distill", disable: bool | None = None) -> None:
        self.desc, self.disable, self.bar = desc, disable, None

    def on_start(self, state: DistillState, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=state.iteration, desc=self.desc, disable=self.disable)

    def on_iteration(self, state: DistillState) -> None:
        post = {"loss": f"{state.loss:.4g}"}
        post.update({k: f"{v:.3g}" for k, v in state.objective.report().items()})
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def on_end(self, state: DistillState) -> None:
        self.bar.close()


class PeriodicEvaluation(Callback):
    """Every ``every`` iterations (and at the end), call ``fn(syn) -> {name: value}`` and log it.

    Logged values are for watching a run; nothing picks a checkpoint by them.
    """

    def __init__(self, every: int, fn: Callable[[SyntheticSet], dict[str, float]]) -> None:
        self.every, self.fn = every, fn

    def _log(self, state: DistillState) -> None:
        for name, value in self.fn(state.syn).items():
            state.metrics.setdefault(name, []).append((state.iteration, float(value)))

    def on_iteration(self, state: DistillState) -> None:
        if self.every > 0 and state.iteration % self.every == 0:
            self._log(state)

    def on_end(self, state: DistillState) -> None:
        already = any(it == state.iteration for series in state.metrics.values() for it, _ in series)
        if not already:
            self._log(state)


class Checkpointer(Callback):
    """Write a resumable checkpoint every ``every`` iterations and at the end (atomically)."""

    def __init__(self, path: str | Path, every: int) -> None:
        self.path, self.every = Path(path), every
        self.save: Callable[[DistillState], None] | None = None  # bound by distill()

    def on_iteration(self, state: DistillState) -> None:
        if self.every > 0 and state.iteration % self.every == 0 and self.save is not None:
            self.save(state)

    def on_end(self, state: DistillState) -> None:
        if self.save is not None:
            self.save(state)


class TimeLimit(Callback):
    """End the run once ``seconds`` of distillation have passed (e.g. "15 minutes of distilling")."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_iteration(self, state: DistillState) -> None:
        if state.seconds >= self.seconds:
            state.stop = True


def _finite(params: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def distill(
    syn: SyntheticSet,
    objective: Objective,
    ctx: MatchingContext,
    config: DistillConfig,
    callbacks: Sequence[Callback] = (),
    resume: str | Path | None = None,
) -> DistillResult:
    """Optimize ``syn`` in place with ``objective`` for ``config.iterations`` iterations.

    ``resume`` names a checkpoint written by a :class:`Checkpointer`; the run continues
    after its iteration with the same S, optimizer, objective state and RNG streams.
    Raises :class:`DistillationDiverged` (naming the iteration) if the loss or S turns
    NaN/Inf; S is then restored to its last finite state and no checkpoint is overwritten.
    """
    objective.setup(ctx, syn)
    groups: list[dict[str, Any]] = [{"params": [p for n, p in syn.named_parameters() if n != "label_logits"]}]
    if syn.label_logits is not None:
        groups.append({"params": [syn.label_logits], "lr": config.lr_labels})
    groups += objective.parameter_groups()
    optimizer = torch.optim.SGD(groups, lr=config.lr_images, momentum=config.momentum)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # S and objective parameters

    state = DistillState(iteration=0, syn=syn, objective=objective)
    if resume is not None:
        ckpt = torch.load(resume, map_location=ctx.device, weights_only=True)
        syn.load_state_dict(ckpt["syn"])
        optimizer.load_state_dict(ckpt["optimizer"])
        objective.load_state_dict(ckpt["objective"])
        ctx.generator.set_state(ckpt["generator"].cpu())
        if ctx.augment is not None:
            ctx.augment.generator.set_state(ckpt["augment_generator"].cpu())
        state.iteration, state.losses = int(ckpt["iteration"]), list(ckpt["losses"])
        state.metrics = {k: [tuple(p) for p in v] for k, v in ckpt["metrics"].items()}
        state.seconds = float(ckpt["seconds"])

    def save(st: DistillState, path: Path) -> None:
        state_dict = {
            "syn": syn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "objective": objective.state_dict(),
            "generator": ctx.generator.get_state(),
            "augment_generator": ctx.augment.generator.get_state() if ctx.augment else torch.empty(0),
            "iteration": st.iteration,
            "losses": st.losses,
            "metrics": {k: [list(p) for p in v] for k, v in st.metrics.items()},
            "seconds": st.seconds,
            "config": asdict(config),
        }
        atomic_write(path, lambda f: torch.save(state_dict, f))

    for cb in callbacks:
        if isinstance(cb, Checkpointer):
            cb.save = lambda st, path=cb.path: save(st, path)
        cb.on_start(state, config.iterations)

    start = time.perf_counter() - state.seconds
    while state.iteration < config.iterations:
        it = state.iteration + 1
        net = objective.network(ctx)
        steps = objective.outer_steps(syn)
        total = 0.0
        for outer in range(steps):
            good = [p.detach().clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
            loss = objective.loss(ctx, net, syn)
            if not torch.isfinite(loss):
                raise DistillationDiverged(_diverged_message(it, "loss", config))
            loss.backward()
            optimizer.step()
            if not _finite(params):
                with torch.no_grad():
                    for p, g in zip(params, good):
                        p.copy_(g)
                raise DistillationDiverged(_diverged_message(it, "synthetic set or a learned parameter", config))
            total += float(loss.detach())
            if outer < steps - 1:
                objective.update_network(ctx, net, syn)
        state.iteration, state.loss = it, total / steps
        state.losses.append(state.loss)
        state.seconds = time.perf_counter() - start
        for cb in callbacks:
            cb.on_iteration(state)
        if state.stop:
            break
    for cb in callbacks:
        cb.on_end(state)
    return DistillResult(state.losses, state.seconds, state.iteration, state.metrics, objective.report())


def _diverged_message(it: int, what: str, config: DistillConfig) -> str:
    return (
        f"the {what} became NaN/Inf at iteration {it}; the synthetic set was restored to its last "
        f"finite state and earlier checkpoints are kept. Try a smaller learning rate "
        f"(lr_images={config.lr_images:g}, e.g. {config.lr_images / 10:g})."
    )
