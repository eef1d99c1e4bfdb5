"""Trajectory matching: MTT (Cazenavette et al., "Dataset Distillation by Matching Training
Trajectories", CVPR 2022) and its constant-memory variant TESLA (Cui et al., "Scaling Up Dataset
Distillation to ImageNet-1K with Constant Memory", ICML 2023).

Experts are networks trained on all the real data with parameters saved after every epoch.
Each iteration picks an expert and a start epoch, runs ``syn_steps`` SGD steps on synthetic
minibatches from the expert's parameters at that epoch with a learnable step size, and
measures how far the student lands from the expert ``expert_epochs`` later, relative to how far
the expert itself moved:

    L = ||theta_student - theta_expert(t + M)||^2 / ||theta_expert(t) - theta_expert(t + M)||^2

MTT back-propagates through the whole unrolled student trajectory, so memory grows with
``syn_steps``. TESLA (``constant_memory=True``) runs the steps twice instead, keeping one step's
graph at a time (see :meth:`TrajectoryMatching.loss`).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..augment import DSA, AugParams
from ..data import DatasetSpec
from ..evaluate import train_epochs
from ..io import atomic_write
from ..models import make_model
from ..options import Option
from ..sampling import ClassSampler
from ..synthetic import SyntheticSet
from .base import DistillationDiverged, MatchingContext, Objective, Plan

__all__ = [
    "ExpertSegment",
    "TrajectoryMatching",
    "expert_cache_key",
    "mtt_settings",
    "train_experts",
]

Trajectory = list[dict[str, torch.Tensor]]
_EXPERT_FORMAT = "fedcl-dd/experts/1"


def train_experts(
    real: ClassSampler,
    spec: DatasetSpec,
    model: str = "convnet",
    num_experts: int = 5,
    epochs: int = 25,
    lr: float = 0.01,
    batch_size: int = 256,
    augment: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[Trajectory]:
    """Train ``num_experts`` fresh ``model`` networks on all of ``real``, as MTT's buffer script does.

    Plain SGD at a constant ``lr`` (no momentum, no weight decay), DSA with per-sample draws
    when ``augment``. Returns, per expert, ``epochs + 1`` CPU snapshots of the parameters
    (index 0 = initialization, index e = after epoch e). Initializations, batches and
    augmentations all draw from ``generator`` (None: one seeded with 0).
    """
    if num_experts < 1 or epochs < 1:
        raise ValueError(f"num_experts and epochs must be >= 1, got {num_experts} and {epochs}")
    device = torch.device(device) if device is not None else real.device
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    aug = DSA(spec.dsa_strategy, generator=generator) if augment else None
    images, labels = real.x.to(device), real.y.to(device)
    experts = []
    with tqdm(total=num_experts * epochs, desc="experts", disable=not progress) as bar:
        for _ in range(num_experts):
            net = make_model(
                model, spec.channels, spec.num_classes, spec.image_size, generator, device
            )
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            trajectory = [_snapshot(net)]
            for _ in range(epochs):
                train_epochs(net, opt, images, labels, 1, batch_size, aug, generator)
                trajectory.append(_snapshot(net))
                bar.update(1)
            experts.append(trajectory)
    return experts


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in net.named_parameters()}


def expert_cache_key(
    real: ClassSampler, spec: DatasetSpec, model: str, settings: dict[str, Any]
) -> str:
    """SHA-256 naming a set of experts: dataset, model, training settings and the real data itself.

    The data enters as its size and checksums of its labels and images, so experts trained on
    one client's partition are never reused for another's.
    """
    h = hashlib.sha256()
    meta = {
        "format": _EXPERT_FORMAT,
        "dataset": spec.name,
        "model": model,
        "n": int(real.y.numel()),
    }
    meta.update(settings)
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(real.y.detach().cpu().contiguous().numpy().tobytes())
    h.update(real.x.detach().cpu().contiguous().numpy().data)
    return h.hexdigest()


def _save_experts(path: Path, experts: list[Trajectory], key: str) -> None:
    tensors = {
        f"{e}/{t}/{name}": p
        for e, trajectory in enumerate(experts)
        for t, snapshot in enumerate(trajectory)
        for name, p in snapshot.items()
    }
    meta = {
        "format": _EXPERT_FORMAT,
        "key": key,
        "num_experts": str(len(experts)),
        "epochs": str(len(experts[0]) - 1),
        "names": json.dumps(list(experts[0][0])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def _load_experts(path: Path, key: str) -> list[Trajectory]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _EXPERT_FORMAT or meta.get("key") != key:
        raise ValueError(f"{path} does not hold the experts for key {key[:16]}")
    tensors = load_file(str(path))
    names = json.loads(meta["names"])
    return [
        [
            {name: tensors[f"{e}/{t}/{name}"] for name in names}
            for t in range(int(meta["epochs"]) + 1)
        ]
        for e in range(int(meta["num_experts"]))
    ]


class ExpertSegment(nn.Module):
    """One iteration's "network" for trajectory matching: a functional student and its target.

    ``forward(x, theta)`` runs ``shell`` with the flat parameter vector ``theta`` (through
    :func:`torch.func.functional_call`), so student parameters are plain tensors in a graph.
    ``start``/``target`` are the expert's flat parameters at epochs ``epoch`` and
    ``epoch + expert_epochs``.
    """

    def __init__(
        self, shell: nn.Module, start: torch.Tensor, target: torch.Tensor, expert: int, epoch: int
    ) -> None:
        super().__init__()
        self.shell = shell
        self.start, self.target = start, target
        self.expert, self.epoch = expert, epoch
        self._names = [n for n, _ in shell.named_parameters()]
        self._shapes = [p.shape for _, p in shell.named_parameters()]
        self._sizes = [p.numel() for _, p in shell.named_parameters()]

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split(self._sizes)
        params = {n: t.view(s) for n, t, s in zip(self._names, pieces, self._shapes, strict=True)}
        return functional_call(self.shell, params, (x,))


Step = tuple[torch.Tensor, AugParams | None]  # minibatch indices, augmentation draw


# MTT's published CIFAR-10 settings by images per class (no MNIST row was published).
_MTT_ROWS = {
    1: dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_lr=1e-7, lr_teacher=0.01),
    10: dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_lr=1e-5, lr_teacher=0.001),
    50: dict(
        syn_steps=30,
        expert_epochs=2,
        max_start_epoch=40,
        lr_lr=1e-5,
        lr_teacher=0.001,
        expert_train_epochs=42,
    ),
}


def mtt_settings(ipc: int) -> dict[str, Any]:
    """MTT's settings for ``ipc`` images per class: the published row at or below ``ipc``."""
    return dict(_MTT_ROWS[max(r for r in _MTT_ROWS if r <= max(1, ipc))])


class TrajectoryMatching(Objective):
    """MTT, or TESLA with ``constant_memory=True``.

    Defaults follow MTT's CIFAR-10 row for 10 images per class: ``syn_steps=30``,
    ``expert_epochs=2``, ``max_start_epoch=20``, ``lr_teacher=0.001`` (initial learnable step
    size), ``lr_lr=1e-5`` (its learning rate; momentum comes from the loop's optimizer, 0.5
    as in MTT), with an image learning rate of 100 (``DistillConfig(lr_images=100)``, what the
    CLI uses for ``tm``). ``batch_syn=None`` puts every synthetic image in each student step.

    Experts: ``num_experts`` networks (MTT: 100) trained for ``expert_train_epochs`` epochs
    (MTT: 50; 25 leaves room for ``max_start_epoch + expert_epochs``) on all of ``ctx.real``
    (:func:`train_experts`, lr ``expert_lr``, batch ``expert_batch``, DSA if
    ``expert_augment``, seeded by ``expert_seed``). With ``expert_dir`` they are cached there
    as safetensors under a name hashed from everything that defines them
    (:func:`expert_cache_key`) and reused when present; ``None`` keeps them in memory only.

    The learnable step size is used as is (as in MTT, so ``lr_lr`` keeps MTT's meaning); MTT's
    known failure, the step size turning negative or NaN, stops the run with
    :class:`fedcl_dd.distill.DistillationDiverged` naming the iteration instead of
    continuing with a meaningless student.
    """

    name = "tm"
    _MTT = "(default: MTT's row for the images per class)"
    options = (
        Option("syn_steps", int, None, f"student steps on S per iteration {_MTT}", low=1),
        Option("expert_epochs", int, None, f"expert epochs the student must cover {_MTT}", low=1),
        Option(
            "max_start_epoch", int, None, f"latest expert epoch a segment starts at {_MTT}", low=0
        ),
        Option(
            "lr_teacher",
            float,
            None,
            f"initial learnable student step size {_MTT}",
            low=0,
            open_low=True,
        ),
        Option(
            "lr_lr", float, None, f"learning rate of the step size {_MTT}", low=0, open_low=True
        ),
        Option("batch_syn", int, None, "synthetic images per student step (default: all)", low=1),
        Option("constant_memory", bool, False, "TESLA's constant-memory gradient"),
        Option("num_experts", int, 5, "expert trajectories to train", low=1),
        Option("expert_train_epochs", int, 25, "epochs each expert trains (MTT: 50)", low=1),
        Option("expert_lr", float, 0.01, "experts' learning rate", low=0, open_low=True),
        Option("expert_batch", int, 256, "experts' batch size", low=1),
        Option("expert_augment", bool, True, "train experts with DSA"),
        Option("expert_seed", int, 0, "seed of the experts' training"),
    )
    lr_by_ipc = ((1, 100.0), (50, 1000.0))  # MTT's CIFAR-10 rows
    quick = {
        "num_experts": 1,
        "expert_train_epochs": 2,
        "max_start_epoch": 0,
        "syn_steps": 2,
        "expert_epochs": 1,
    }
    paper = "mtt"

    @classmethod
    def defaults(cls, plan: Plan) -> dict[str, Any]:
        """The declared defaults plus MTT's published row at or below ``plan.ipc``; experts are
        cached under ``plan.cache_dir/experts`` when a cache folder is given."""
        cache = {"expert_dir": plan.cache_dir / "experts"} if plan.cache_dir is not None else {}
        return {**super().defaults(plan), **mtt_settings(plan.ipc), **cache}

    def __init__(
        self,
        syn_steps: int = 30,
        expert_epochs: int = 2,
        max_start_epoch: int = 20,
        lr_teacher: float = 0.001,
        lr_lr: float = 1e-5,
        batch_syn: int | None = None,
        constant_memory: bool = False,
        num_experts: int = 5,
        expert_train_epochs: int = 25,
        expert_lr: float = 0.01,
        expert_batch: int = 256,
        expert_augment: bool = True,
        expert_seed: int = 0,
        expert_dir: str | Path | None = None,
    ) -> None:
        if syn_steps < 1 or expert_epochs < 1 or max_start_epoch < 0 or num_experts < 1:
            raise ValueError(
                "syn_steps, expert_epochs and num_experts must be >= 1 and max_start_epoch >= 0; got "
                f"{syn_steps}, {expert_epochs}, {num_experts} and {max_start_epoch}"
            )
        if max_start_epoch + expert_epochs > expert_train_epochs:
            raise ValueError(
                f"max_start_epoch + expert_epochs = {max_start_epoch + expert_epochs} exceeds the "
                f"experts' {expert_train_epochs} training epochs: raise expert_train_epochs or lower "
                "the others"
            )
        if not (lr_teacher > 0 and lr_lr >= 0 and expert_lr > 0):
            raise ValueError(
                f"need lr_teacher > 0, lr_lr >= 0, expert_lr > 0; got {lr_teacher}, {lr_lr}, {expert_lr}"
            )
        if batch_syn is not None and batch_syn < 1:
            raise ValueError(f"batch_syn must be >= 1 or None, got {batch_syn}")
        self.syn_steps = syn_steps
        self.expert_epochs = expert_epochs
        self.max_start_epoch = max_start_epoch
        self.lr_teacher = lr_teacher
        self.lr_lr = lr_lr
        self.batch_syn = batch_syn
        self.constant_memory = constant_memory
        self.num_experts = num_experts
        self.expert_train_epochs = expert_train_epochs
        self.expert_lr = expert_lr
        self.expert_batch = expert_batch
        self.expert_augment = expert_augment
        self.expert_seed = expert_seed
        self.expert_dir = Path(expert_dir) if expert_dir is not None else None
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_teacher)))
        self.iteration = 0
        self._trajectories: list[torch.Tensor] = []  # per expert, (epochs + 1, P) flat parameters
        self._key: str | None = None  # cache key of the loaded experts
        self._shell: nn.Module | None = None

    # -- experts ------------------------------------------------------------------------------
    def expert_path(self, ctx: MatchingContext) -> Path | None:
        """Where the experts for ``ctx`` are cached (``None`` without ``expert_dir``)."""
        return self._path(ctx, self._cache_key(ctx))

    def _path(self, ctx: MatchingContext, key: str) -> Path | None:
        if self.expert_dir is None:
            return None
        return self.expert_dir / f"experts-{ctx.spec.name}-{ctx.model}-{key[:16]}.safetensors"

    def _cache_key(self, ctx: MatchingContext) -> str:
        settings = {
            "num_experts": self.num_experts,
            "epochs": self.expert_train_epochs,
            "lr": self.expert_lr,
            "batch": self.expert_batch,
            "augment": ctx.spec.dsa_strategy if self.expert_augment else None,
            "seed": self.expert_seed,
        }
        return expert_cache_key(ctx.real, ctx.spec, ctx.model, settings)

    def _experts(self, ctx: MatchingContext, key: str) -> list[Trajectory]:
        path = self._path(ctx, key)
        if path is not None and path.is_file():
            try:
                return _load_experts(path, key)
            except (SafetensorError, OSError, ValueError, KeyError) as exc:
                warnings.warn(f"retraining experts: could not reuse {path} ({exc})", stacklevel=2)
        experts = train_experts(
            ctx.real,
            ctx.spec,
            ctx.model,
            self.num_experts,
            self.expert_train_epochs,
            self.expert_lr,
            self.expert_batch,
            self.expert_augment,
            torch.Generator().manual_seed(self.expert_seed),
            ctx.device,
        )
        if path is not None:
            _save_experts(path, experts, key)
        return experts

    def setup(self, ctx: MatchingContext, syn: SyntheticSet) -> None:
        """Load the experts from the cache, or train (and cache) them; reset the iteration count.

        Experts already loaded for the same key are kept, so repeated runs on the same data
        (federated rounds, benchmarks) pay for them once even without ``expert_dir``.
        """
        self._shell = ctx.fresh_network()
        key = self._cache_key(ctx)
        if key != self._key:
            names = [n for n, _ in self._shell.named_parameters()]
            shapes = {n: p.shape for n, p in self._shell.named_parameters()}
            experts = self._experts(ctx, key)
            got = {n: p.shape for n, p in experts[0][0].items()}
            if got != shapes:
                raise ValueError(
                    f"the experts' parameters {sorted(got)} do not fit the model {ctx.model!r}"
                )
            self._trajectories = [
                torch.stack(
                    [torch.cat([snapshot[n].flatten() for n in names]) for snapshot in trajectory]
                )
                for trajectory in experts
            ]
            self._key = key
        if self.syn_lr.device != ctx.device:
            self.syn_lr = nn.Parameter(self.syn_lr.detach().to(ctx.device))
        self.iteration = 0

    # -- the loop's hooks ---------------------------------------------------------------------
    def network(self, ctx: MatchingContext) -> nn.Module:
        """A random expert segment (expert, start epoch <= ``max_start_epoch``) from ``ctx.generator``."""
        if self._shell is None:
            raise RuntimeError("call setup() first: the experts are not loaded")
        self.iteration += 1
        expert = int(torch.randint(len(self._trajectories), (1,), generator=ctx.generator))
        epoch = int(torch.randint(self.max_start_epoch + 1, (1,), generator=ctx.generator))
        trajectory = self._trajectories[expert]
        start = trajectory[epoch].to(ctx.device)
        target = trajectory[epoch + self.expert_epochs].to(ctx.device)
        return ExpertSegment(self._shell, start, target, expert, epoch)

    def loss(self, ctx: MatchingContext, net: nn.Module, syn: SyntheticSet) -> torch.Tensor:
        """The matching loss; with ``constant_memory`` a surrogate with TESLA's gradient.

        TESLA: a first pass runs the student steps without graphs and gives the exact
        loss and ``v = dL/dtheta_N``. A second pass re-runs the steps from ``theta_0`` (no
        per-step copies are kept), one graph at a time, and adds step i's contribution
        ``-lr * d<g_i, v>/d(images, targets)`` with ``theta_i`` held constant, as TESLA's
        reference does (later steps' dependence on earlier images is dropped, so it is close
        to, not equal to, the full unroll); the step size gets ``-sum_i <g_i, v>``. The
        returned scalar is ``<images, G> + <targets, G_t> + lr * g_lr`` made to carry the true
        loss value: the loop's ``backward()`` then sends exactly these gradients on through
        ``syn.images()``/``syn.targets()`` (to pixels, or to bases and addresses).
        """
        if not isinstance(net, ExpertSegment):
            raise TypeError(
                f"trajectory matching needs the ExpertSegment from network(), got {type(net).__name__}"
            )
        self._check_step_size()
        n = syn.num_images
        schedule = self._schedule(ctx, n, syn.class_ids.device)
        if self.constant_memory:
            return self._tesla(net, syn, schedule, ctx)
        images, targets = syn.images(), syn.targets()
        theta = net.start.clone().requires_grad_(True)
        for idx, aug in schedule:
            g = self._student_grad(
                net, theta, ctx.apply(images[idx], aug), targets[idx], create_graph=True
            )
            theta = theta - self.syn_lr * g
        return self._match(net, theta)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.syn_lr], "lr": self.lr_lr}]

    def state_dict(self) -> dict[str, Any]:
        return {"syn_lr": self.syn_lr.detach().clone(), "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # In place: the loop's optimizer already holds this very parameter.
        with torch.no_grad():
            self.syn_lr.copy_(torch.as_tensor(state["syn_lr"]))
        self.iteration = int(state["iteration"])

    def report(self) -> dict[str, float]:
        return {"syn_lr": float(self.syn_lr.detach())}

    # -- internals ----------------------------------------------------------------------------
    def _check_step_size(self) -> None:
        lr = float(self.syn_lr.detach())
        if not (math.isfinite(lr) and lr > 0):
            raise DistillationDiverged(
                f"trajectory matching's learnable step size is {lr:g} at iteration {self.iteration} "
                f"(it must stay positive and finite; MTT is known to blow up this way): lower lr_lr "
                f"(now {self.lr_lr:g}) or the image learning rate"
            )

    def _schedule(self, ctx: MatchingContext, n: int, device: torch.device) -> list[Step]:
        """Minibatch indices and per-sample augmentation draws of every student step.

        Batches walk through random permutations of the synthetic set, as MTT's do. Drawn once
        per iteration so that TESLA's two passes see identical steps.
        """
        batch = min(self.batch_syn or n, n)
        chunks: list[torch.Tensor] = []
        steps = []
        for _ in range(self.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n, generator=ctx.generator).split(batch))
            idx = chunks.pop(0)
            aug = ctx.augment.sample(idx.numel()) if ctx.augment is not None else None
            steps.append((idx.to(device), aug))
        return steps

    @staticmethod
    def _student_grad(
        net: ExpertSegment,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        create_graph: bool,
    ) -> torch.Tensor:
        loss = F.cross_entropy(net(x, theta), y)
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]

    @staticmethod
    def _match(net: ExpertSegment, theta: torch.Tensor) -> torch.Tensor:
        return ((theta - net.target) ** 2).sum() / ((net.start - net.target) ** 2).sum()

    def _tesla(
        self, net: ExpertSegment, syn: SyntheticSet, schedule: list[Step], ctx: MatchingContext
    ) -> torch.Tensor:
        lr = self.syn_lr.detach()
        images, targets = syn.images(), syn.targets()
        img = images.detach().requires_grad_(True)
        soft = targets.is_floating_point()
        tgt = targets.detach().requires_grad_(soft)

        # Pass 1: the student's end point, no graph beyond one step's weight gradient.
        theta = net.start
        for idx, aug in schedule:
            x, y = ctx.apply(img.detach()[idx], aug), tgt.detach()[idx]
            theta = theta - lr * self._weight_grad(net, theta, x, y)
        with torch.no_grad():
            value = self._match(net, theta)
            v = 2 * (theta - net.target) / ((net.start - net.target) ** 2).sum()

        # Pass 2: each step's contribution, one graph at a time, from theta_0 again.
        # g_tgt stays zero for hard labels (their d_tgt is zero).
        g_img, g_tgt = torch.zeros_like(img), torch.zeros_like(tgt, dtype=img.dtype)
        g_lr = torch.zeros((), device=img.device)
        theta = net.start
        for idx, aug in schedule:
            g, d_img, d_tgt = self._tesla_step(net, theta, img, tgt, idx, aug, ctx, v)
            g_img -= lr * d_img
            g_tgt -= lr * d_tgt
            g_lr -= (g * v).sum()
            theta = theta - lr * g

        surrogate = (images * g_img).sum() + self.syn_lr * g_lr
        if soft:
            surrogate = surrogate + (targets * g_tgt).sum()
        return surrogate - surrogate.detach() + value

    def _weight_grad(
        self, net: ExpertSegment, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """The student's weight gradient at ``theta`` on the batch ``(x, y)``, with no graph."""
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            g = self._student_grad(net, theta, x, y, create_graph=False)
        return g.detach()

    def _tesla_step(
        self,
        net: ExpertSegment,
        theta: torch.Tensor,
        img: torch.Tensor,
        tgt: torch.Tensor,
        idx: torch.Tensor,
        aug: AugParams | None,
        ctx: MatchingContext,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One student step at ``theta``: its weight gradient g and the gradients of ``<g, v>``
        with respect to the images and the soft targets (zero for hard labels). A function of
        its own so that the step's graph is gone when it returns."""
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            g = self._student_grad(
                net, theta, ctx.apply(img[idx], aug), tgt[idx], create_graph=True
            )
            if tgt.requires_grad:
                d_img, d_tgt = torch.autograd.grad((g * v).sum(), [img, tgt])
            else:
                (d_img,) = torch.autograd.grad((g * v).sum(), [img])
                d_tgt = torch.zeros((), device=img.device)
        return g.detach(), d_img, d_tgt
