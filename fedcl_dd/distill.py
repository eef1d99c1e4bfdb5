"""The one distillation loop every objective shares (the survey's Algorithm 1).

::

    initialize S
    repeat for each iteration:
        net <- objective.network(ctx)            # fresh, or from a pool (experts, global model)
        for each outer step:
            loss <- objective.loss(ctx, net, S); update S by SGD
            objective.update_network(ctx, net, S)   # gradient matching trains net on S

Callbacks see every iteration (progress bars, periodic evaluation, checkpoints);
:class:`Checkpointer` is one of them: it saves S, the optimizer, the objective's
state and every RNG state, and restores them so that a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .compiled import check_mode
from .io import CorruptCheckpoint, load_checkpoint, save_checkpoint
from .objectives.base import DistillationDiverged, MatchingContext, Objective
from .precision import PRECISIONS, Precision
from .progress import ETA_AFTER, say_expected
from .synthetic import SyntheticSet

__all__ = [
    "Callback",
    "Checkpointer",
    "DistillConfig",
    "DistillResult",
    "DistillState",
    "DistillationDiverged",
    "PeriodicEvaluation",
    "ProgressBar",
    "TimeLimit",
    "distill",
    "make_optimizer",
]


@dataclass
class DistillConfig:
    """Optimizer and schedule for S: SGD with momentum, as in DC/DSA/DM.

    ``precision="bf16"`` computes the objective's loss (embeddings, matching) under bfloat16
    autocast (:mod:`fedcl_dd.precision`); S and its optimizer stay fp32. ``compile`` (a
    :data:`~fedcl_dd.compiled.COMPILE_MODES` mode; None, the default, runs eager) compiles the
    embeddings of the distribution-matching family's networks (:mod:`fedcl_dd.compiled`).
    """

    iterations: int = 1000
    lr_images: float = 1.0
    momentum: float = 0.5
    lr_labels: float = 1.0
    precision: str = "fp32"
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile is not None:
            check_mode(self.compile, "None")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.lr_images > 0:
            raise ValueError(f"lr_images must be > 0, got {self.lr_images}")


@dataclass
class DistillState:
    """What callbacks see: the iteration just finished, the history so far, and everything the
    loop runs with (so that a callback such as :class:`Checkpointer` can save and restore it)."""

    iteration: int
    syn: SyntheticSet
    objective: Objective
    ctx: MatchingContext
    config: DistillConfig
    optimizer: torch.optim.Optimizer
    loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stop: bool = False  # a callback sets this to end the run after the current iteration
    time_limit: float | None = None  # seconds after which a callback ends the run, if any


@dataclass
class DistillResult:
    """Outcome of :func:`distill`: loss per iteration, logged metrics, time spent."""

    losses: list[float]
    seconds: float
    iterations: int
    metrics: dict[str, list[tuple[int, float]]]
    report: dict[str, float]


class Callback:
    """Hooks called by :func:`distill`; override what you need.

    ``on_prepare`` runs for every callback before any ``on_start`` (restoring a checkpoint
    there lets the others start from the restored iteration).
    """

    def on_prepare(self, state: DistillState) -> None: ...

    def on_start(self, state: DistillState, total: int) -> None: ...

    def on_iteration(self, state: DistillState) -> None: ...

    def on_end(self, state: DistillState) -> None: ...


class ProgressBar(Callback):
    """A tqdm progress bar showing the loss and the objective's report (e.g. epsilon).

    Whether or not the bar is shown, a run expected to last over a minute says so on stderr
    once :data:`~fedcl_dd.progress.ETA_AFTER` iterations after the first are timed, with the
    expected minutes (the first is left out: it warms up caches and, with ``compile``,
    compiles).
    """

    def __init__(self, desc: str = "distill", disable: bool | None = None) -> None:
        self.desc, self.disable = desc, disable
        self.bar: tqdm | None = None
        self.total, self.first, self.started = 0, 0, 0.0

    def on_start(self, state: DistillState, total: int) -> None:
        self.bar = tqdm(total=total, initial=state.iteration, desc=self.desc, disable=self.disable)
        self.total, self.first = total, state.iteration

    def on_iteration(self, state: DistillState) -> None:
        if state.iteration - self.first == 1:
            self.started = time.perf_counter()
        if state.iteration - self.first == 1 + ETA_AFTER:
            per = (time.perf_counter() - self.started) / ETA_AFTER
            remaining = self.total - state.iteration
            left = per * remaining
            if state.time_limit is not None and state.time_limit - state.seconds < left:
                # The time limit ends the run first: say that, not the iteration count's time.
                left = max(0.0, state.time_limit - state.seconds)
                remaining = min(remaining, round(left / per))
            say_expected(self.desc, per, remaining, "iteration", left)
        post = {"loss": f"{state.loss:.4g}"}
        post.update({k: f"{v:.3g}" for k, v in state.objective.report().items()})
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def on_end(self, state: DistillState) -> None:
        if self.bar is not None:
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
        already = any(
            it == state.iteration for series in state.metrics.values() for it, _ in series
        )
        if not already:
            self._log(state)


class Checkpointer(Callback):
    """Write a resumable checkpoint every ``every`` iterations and at the end (atomically).

    A checkpoint holds S, the optimizer, the objective's state, every RNG stream, the
    history and the elapsed time. With ``resume=True`` the run first restores ``path``
    and continues after its iteration exactly as the interrupted run would have.
    """

    def __init__(self, path: str | Path, every: int, resume: bool = False) -> None:
        self.path, self.every, self.resume = Path(path), every, resume

    def on_prepare(self, state: DistillState) -> None:
        if not self.resume:
            return
        if not self.path.is_file():
            raise FileNotFoundError(
                f"no checkpoint at {self.path} to resume from; start without resuming"
            )
        ckpt = load_checkpoint(self.path, map_location=state.ctx.device)
        try:
            state.syn.load_state_dict(ckpt["syn"])
            state.optimizer.load_state_dict(ckpt["optimizer"])
            state.objective.load_state_dict(ckpt["objective"])
            state.ctx.generator.set_state(ckpt["generator"].cpu())
            if state.ctx.augment is not None:
                state.ctx.augment.generator.set_state(ckpt["augment_generator"].cpu())
            state.iteration, state.losses = int(ckpt["iteration"]), list(ckpt["losses"])
            state.metrics = {k: [tuple(p) for p in v] for k, v in ckpt["metrics"].items()}
            state.seconds = float(ckpt["seconds"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise CorruptCheckpoint(
                f"{self.path} does not fit this run ({type(exc).__name__}: {exc}); "
                "resume with the settings that wrote it or start without resuming"
            ) from None
        if not all(torch.isfinite(p).all() for p in state.syn.parameters()):
            raise CorruptCheckpoint(f"{self.path} holds a synthetic set with NaN or Inf")

    def save(self, state: DistillState) -> None:
        """Write ``state`` to ``path`` now."""
        ctx = state.ctx
        state_dict = {
            "syn": state.syn.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "objective": state.objective.state_dict(),
            "generator": ctx.generator.get_state(),
            "augment_generator": ctx.augment.generator.get_state()
            if ctx.augment
            else torch.empty(0),
            "iteration": state.iteration,
            "losses": state.losses,
            "metrics": {k: [list(p) for p in v] for k, v in state.metrics.items()},
            "seconds": state.seconds,
            "config": asdict(state.config),
        }
        save_checkpoint(state_dict, self.path)

    def on_iteration(self, state: DistillState) -> None:
        if self.every > 0 and state.iteration % self.every == 0:
            self.save(state)

    def on_end(self, state: DistillState) -> None:
        self.save(state)


class TimeLimit(Callback):
    """End the run once its clock reads ``seconds`` (e.g. "15 minutes of distilling"); the clock
    counts the distillation and the work a run does before it, such as training a teacher."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_prepare(self, state: DistillState) -> None:
        limits = [t for t in (state.time_limit, self.seconds) if t is not None]
        state.time_limit = min(limits)  # what a progress bar's expected duration goes by

    def on_iteration(self, state: DistillState) -> None:
        if state.seconds >= self.seconds:
            state.stop = True


def _finite(params: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def make_optimizer(
    syn: SyntheticSet, objective: Objective, config: DistillConfig
) -> torch.optim.Optimizer:
    """The objective's optimizer (SGD with momentum, or AdamW: ``Objective.optimizer``) over S
    (labels at ``lr_labels`` when learnable) and the objective's own parameters."""
    groups = syn.param_groups(config.lr_images)
    if syn.label_logits is not None:
        groups.append({"params": [syn.label_logits], "lr": config.lr_labels})
    groups += objective.parameter_groups()
    if objective.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr_images, weight_decay=objective.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr_images, momentum=config.momentum)


def distill(
    syn: SyntheticSet,
    objective: Objective,
    ctx: MatchingContext,
    config: DistillConfig,
    callbacks: Sequence[Callback] = (),
    spent: float = 0.0,
) -> DistillResult:
    """Optimize ``syn`` in place with ``objective`` for ``config.iterations`` iterations.

    ``spent`` seconds of work done for this run before it (e.g. training a teacher) start its
    clock, so a :class:`TimeLimit` and the result's seconds include them.

    Raises :class:`DistillationDiverged` (naming the iteration) if the loss or S turns
    NaN/Inf; S is then restored to its last finite state and no checkpoint is overwritten.
    A private objective matches in fp32 whatever ``config.precision`` says (with a warning).
    """
    # Private objectives clip each record's embedding to norm C and add noise calibrated to
    # that bound; rounded to bfloat16, a clipped row may exceed C and the guarantee lapses.
    unusable = (
        f"{objective.name!r} clips to a bound that holds only in fp32"
        if objective.private
        else None
    )
    precision = Precision.resolve(config.precision, ctx.device, unusable)
    # The objective's networks may depend on both.
    ctx = replace(ctx, precision=precision, compile=config.compile)
    objective.setup(ctx, syn)
    optimizer = make_optimizer(syn, objective, config)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # S and objective parameters
    state = DistillState(
        iteration=0, syn=syn, objective=objective, ctx=ctx, config=config, optimizer=optimizer
    )
    for cb in callbacks:
        cb.on_prepare(state)
    state.seconds += spent  # after a resumed checkpoint's seconds: both were spent
    for cb in callbacks:
        cb.on_start(state, config.iterations)

    start = time.perf_counter() - state.seconds
    while state.iteration < config.iterations:
        state.loss = _iteration(
            state.iteration + 1, syn, objective, ctx, optimizer, params, precision
        )
        state.iteration += 1
        state.losses.append(state.loss)
        state.seconds = time.perf_counter() - start
        for cb in callbacks:
            cb.on_iteration(state)
        if state.stop:
            break
    for cb in callbacks:
        cb.on_end(state)
    return DistillResult(
        state.losses, state.seconds, state.iteration, state.metrics, objective.report()
    )


def _iteration(
    it: int,
    syn: SyntheticSet,
    objective: Objective,
    ctx: MatchingContext,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    precision: Precision,
) -> float:
    """One iteration: a network, then the objective's outer steps on S; returns the mean loss.

    Only the loss runs under ``precision``'s autocast: networks from pools and the objective's
    network updates (gradient matching training on S) stay fp32.
    """
    net = objective.network(ctx)
    steps = objective.outer_steps(syn)
    lr = optimizer.param_groups[0]["lr"]
    total = 0.0
    for outer in range(steps):
        good = [p.detach().clone() for p in params]
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = objective.loss(ctx, net, syn)
        # fp32 for the finite check and the running mean; backward runs outside autocast, as
        # PyTorch recommends (each op's backward follows the dtype its forward ran in).
        loss = loss.float()
        if not torch.isfinite(loss):
            raise DistillationDiverged(_diverged_message(it, "loss", lr))
        loss.backward()
        optimizer.step()
        if not _finite(params):
            with torch.no_grad():
                for p, g in zip(params, good, strict=True):
                    p.copy_(g)
            raise DistillationDiverged(
                _diverged_message(it, "synthetic set or a learned parameter", lr)
            )
        if objective.projects:
            syn.project_(*ctx.spec.pixel_bounds())
        total += float(loss.detach())
        if outer < steps - 1:
            objective.update_network(ctx, net, syn)
    return total / steps


def _diverged_message(it: int, what: str, lr: float) -> str:
    return (
        f"the {what} became NaN/Inf at iteration {it}; the synthetic set was restored to its last "
        f"finite state and earlier checkpoints are kept. Try a smaller learning rate "
        f"(lr_images={lr:g}, e.g. {lr / 10:g})."
    )
