"""One continual run: a benchmark, a memory at a byte budget, a strategy, Avalanche's metrics.

The command line (``fedcl-dd continual``), the benchmark script and the tests run
every configuration through :func:`run_stream`, so all rows share the model,
epochs, seeds, batch mix and metrics. Baselines are at the same bytes:

* Avalanche's own buffers inside ``ReplayPlugin``: ``replay`` (``ReservoirSamplingBuffer``),
  ``class-balanced`` (``ClassBalancedBuffer``), ``herding`` (``ParametricBuffer`` with
  ``HerdingSelectionStrategy``); and ``gdumb`` (``GDumbPlugin``);
* Avalanche's own replay strategies, which take the place of ``Naive`` / ``EWC``:
  ``er-ace`` (``ER_ACE``) and ``der`` (``DER`` at Avalanche's defaults, alpha 0.1 and
  beta 0.5, i.e. DER++), each replaying ``batch_size_mem`` samples per minibatch (at
  most their memory's size: they replay only once it holds that many);
* ``compressed-real`` (:class:`~.buffers.CompressedRealBuffer`): real images at
  1/``factor`` resolution and the ``storage`` dtype, more of them in the same bytes.

Strategy ``er-ace`` (:class:`~.er_ace.MemoryER_ACE`) trains with ER-ACE's loss over any of
these memories but ``gdumb`` (ours included), in place of ``Naive`` and the replay plugin.

A baseline memory of real images holds ``budget_bytes // sample_bytes`` samples, counted
like our memories: fp32 pixels plus a 2-byte label, plus DER's fp32 logits per sample.

Learners: the core's models (``mlp``, ``convnet``, ...) and Avalanche's ``SlimResNet18``
(``slim-resnet18``, the reduced ResNet-18 of GEM that Avalanche's SplitCIFAR baselines use).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fedcl_dd.scenarios.continual import BENCHMARKS, ContinualBenchmark, make_benchmark
from torch import nn

from fedcl_dd.data import SPECS, DatasetSpec
from fedcl_dd.models import MODELS, make_model
from fedcl_dd.synthetic import bytes_per_image, image_shape3

from .buffers import BUFFERS, CompressedRealBuffer, MemoryBuffer
from .checkpoint import memories, resume, save
from .er_ace import MemoryER_ACE
from .plugin import DEFAULT_BATCH_SIZE_MEM, MemoryReplayPlugin

__all__ = [
    "BUFFER_CHOICES",
    "HERDING_MODELS",
    "MODEL_CHOICES",
    "STRATEGIES",
    "RunConfig",
    "RunResult",
    "make_learner",
    "real_samples_for_budget",
    "run_stream",
    "sample_bytes",
]

BUFFER_CHOICES = (
    *BUFFERS,
    "replay",
    "class-balanced",
    "herding",
    "gdumb",
    "er-ace",
    "der",
    "compressed-real",
)
STRATEGIES = ("naive", "ewc", "er-ace")
STRATEGY_BUFFERS = ("er-ace", "der")  # Avalanche strategies that own their replay buffer
_LOGIT_BYTES = torch.finfo(torch.float32).bits // 8  # DER stores fp32 logits
# Layers whose output is a flat embedding, for Avalanche's herding (it hooks a module's output).
# SlimResNet18 has none: it pools and flattens functionally, so its last module output before
# the classifier is layer4's 4-D map.
_EMBEDDING_LAYER = {"mlp": "body"}
HERDING_MODELS = tuple(_EMBEDDING_LAYER)  # the learners buffer "herding" can select with
SLIM_RESNET18 = "slim-resnet18"  # Avalanche's SlimResNet18
_SLIM_RESNET18_INPUT = (3, 32, 32)  # its forward views every input as 3x32x32
MODEL_CHOICES = (*MODELS, SLIM_RESNET18)


@dataclass
class RunConfig:
    """A continual run. ``epochs`` are epochs over each experience; ``buffer_epochs`` are epochs of
    the fresh model on its memory (``gdumb``, and our memory buffers when ``fresh`` is set)."""

    benchmark: str = "split-digits"
    buffer: str = "pixels"
    budget_bytes: int | None = None
    budget_images: int = (
        100  # used when budget_bytes is None: the bytes of this many labelled images
    )
    seed: int = 0
    strategy: str = "naive"
    ewc_lambda: float = 0.4
    model: str = "mlp"
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    train_mb_size: int = 32
    batch_size_mem: int = DEFAULT_BATCH_SIZE_MEM
    fresh: bool = False
    buffer_epochs: int = 50
    method: str = "dm"
    iterations: int | None = None  # the buffer's default
    lr_images: float | None = None  # the memory's default
    real_per_class: int | None = None  # the memory's default
    downsample: int | None = None  # addressing bases at 1/downsample resolution
    bases: int | None = None
    factor: int | None = None  # compressed-real and multi: sub-images per side, each at 1/factor
    storage: str = "fp32"
    options: dict[str, Any] = field(default_factory=dict)  # the method's (e.g. syn_per_class)
    precision: str = "fp32"  # bf16: distillation losses and fresh-model training under autocast
    # Cap on each memory update's time, as a multiple of the experience's training time.
    build_over_train: float | None = None
    data_root: str | None = None
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(
                f"unknown benchmark {self.benchmark!r}; choose one of {sorted(BENCHMARKS)}"
            )
        if self.buffer not in BUFFER_CHOICES:
            raise ValueError(
                f"unknown buffer {self.buffer!r}; choose one of {list(BUFFER_CHOICES)}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; choose one of {list(STRATEGIES)}"
            )
        for name in ("epochs", "train_mb_size", "batch_size_mem", "buffer_epochs", "budget_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ValueError(f"budget_bytes must be positive, got {self.budget_bytes}")
        if self.buffer in STRATEGY_BUFFERS and self.strategy != "naive":
            raise ValueError(
                f"buffer {self.buffer!r} is Avalanche's own strategy and trains with its own loss; "
                f"it does not combine with strategy {self.strategy!r}: use strategy 'naive'"
            )
        if self.strategy == "er-ace" and (self.buffer == "gdumb" or self.fresh):
            raise ValueError(
                "strategy 'er-ace' replays its memory inside each minibatch; "
                + (
                    "gdumb trains a fresh model on its memory instead"
                    if self.buffer == "gdumb"
                    else "the fresh-model protocol (fresh=True) trains on the memory alone"
                )
                + ": use strategy 'naive' for it"
            )
        if self.model not in MODEL_CHOICES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {list(MODEL_CHOICES)}")
        shape = SPECS[BENCHMARKS[self.benchmark]].image_shape
        if self.model == SLIM_RESNET18 and tuple(shape) != _SLIM_RESNET18_INPUT:
            raise ValueError(
                f"{SLIM_RESNET18} (Avalanche's SlimResNet18) takes 3-channel 32x32 images; "
                f"{self.benchmark} has {'x'.join(map(str, shape))}: use benchmark split-cifar10, "
                "or model mlp or convnet"
            )
        if self.build_over_train is not None:
            if not self.build_over_train > 0:
                raise ValueError(
                    f"build_over_train must be > 0 (a multiple of each experience's training "
                    f"time), or None for no cap; got {self.build_over_train}"
                )
            if self.buffer not in BUFFERS:
                raise ValueError(
                    f"build_over_train caps the matching of our memories ({sorted(BUFFERS)}); "
                    f"buffer {self.buffer!r} runs none: leave it unset"
                )
            if self.strategy == "er-ace":
                # The cap lives in the replay plugin, which er-ace does not use: the memory
                # is built before the experience trains, with no training time to measure.
                raise ValueError(
                    "build_over_train caps a memory update by the experience's training time; "
                    "strategy 'er-ace' builds the memory before training: leave it unset, or "
                    "cap the update with iterations"
                )
        if self.buffer == "compressed-real" and self.iterations:
            raise ValueError(
                f"compressed-real runs no matching iteration (got iterations={self.iterations}); "
                "use buffer 'multi' to distill the same mosaics"
            )

    @property
    def budget(self) -> int:
        if self.budget_bytes is not None:
            return int(self.budget_bytes)
        return self.budget_images * bytes_per_image(SPECS[BENCHMARKS[self.benchmark]].image_shape)


@dataclass
class RunResult:
    """What a run measured, per experience and at the end."""

    config: dict[str, Any]
    accuracy_after: list[float] = field(
        default_factory=list
    )  # stream accuracy after each experience
    forgetting: float = float("nan")  # Avalanche's stream forgetting after the last experience
    buffer_bytes: int = 0
    buffer_samples: int = 0
    distinct_samples: int = 0
    # The fewest matching iterations any update of our memories ran: 0 means some update (or
    # every one) distilled nothing; each update's count is in iterations_per_update.
    matching_iterations: int = 0
    iterations_per_update: list[int] = field(default_factory=list)
    build_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return self.accuracy_after[-1] if self.accuracy_after else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "final_accuracy": self.final_accuracy}


def sample_bytes(image_shape: tuple[int, int, int], logits: int = 0) -> int:
    """Bytes of one real sample in a baseline memory: its fp32 image and 2-byte label, plus
    ``logits`` fp32 logits (DER keeps the model's output for every sample)."""
    return bytes_per_image(image_shape) + logits * _LOGIT_BYTES


def real_samples_for_budget(
    budget_bytes: int, image_shape: tuple[int, int, int], logits: int = 0
) -> int:
    """Real samples (see :func:`sample_bytes`) that fit in ``budget_bytes``."""
    n = budget_bytes // sample_bytes(image_shape, logits)
    if n < 1:
        raise ValueError(
            f"a budget of {budget_bytes} bytes holds no {image_shape} image"
            f"{f' with {logits} logits' if logits else ''}; raise the budget"
        )
    return n


def make_learner(cfg: RunConfig, spec: DatasetSpec) -> nn.Module:
    """The learner ``cfg.model`` for ``spec``'s classes, freshly initialized from ``cfg.seed``."""
    if cfg.model == SLIM_RESNET18:
        from avalanche.models import SlimResNet18

        # Avalanche's model initializes itself from the global RNG: seed a fork of it, so the
        # weights depend on the seed alone and the caller's random stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return SlimResNet18(spec.num_classes)
    generator = torch.Generator().manual_seed(cfg.seed)
    return make_model(cfg.model, spec.channels, spec.num_classes, spec.image_size, generator)


def make_memory(
    cfg: RunConfig, bench: ContinualBenchmark, model: nn.Module
) -> tuple[Any | None, Any]:
    """The replay plugin and its storage policy for ``cfg.buffer`` (one of ours or a baseline);
    buffers ``er-ace`` and ``der`` have none (:func:`make_strategy` builds them with their
    buffer). Under strategy ``er-ace`` the plugin is None: the strategy replays the policy
    itself, with its own loss."""
    from avalanche.training.plugins import GDumbPlugin, ReplayPlugin

    if cfg.buffer in STRATEGY_BUFFERS:
        raise ValueError(f"{cfg.buffer!r} is a strategy with its own buffer: use make_strategy")
    if cfg.buffer == "gdumb":  # its plugin builds its own policy
        plugin = GDumbPlugin(mem_size=real_samples_for_budget(cfg.budget, bench.spec.image_shape))
        return plugin, plugin.storage_policy
    policy = _storage_policy(cfg, bench.spec, model)
    if cfg.strategy == "er-ace":
        return None, policy
    if isinstance(policy, MemoryBuffer):
        return MemoryReplayPlugin(
            policy,
            batch_size_mem=cfg.batch_size_mem,
            fresh_epochs=cfg.buffer_epochs if cfg.fresh else 0,
            seed=cfg.seed,
            precision=cfg.precision,
            build_over_train=cfg.build_over_train,
        ), policy
    return ReplayPlugin(
        mem_size=policy.max_size, batch_size_mem=cfg.batch_size_mem, storage_policy=policy
    ), policy


def _storage_policy(cfg: RunConfig, spec: DatasetSpec, model: nn.Module) -> Any:
    """The memory ``cfg.buffer`` names (but gdumb's): one of ours, or Avalanche's reservoir,
    class-balanced or herding buffer of the real samples that fit the budget."""
    from avalanche.training.storage_policy import (
        ClassBalancedBuffer,
        HerdingSelectionStrategy,
        ParametricBuffer,
        ReservoirSamplingBuffer,
    )

    kinds: dict[str, type[MemoryBuffer]] = {**BUFFERS, "compressed-real": CompressedRealBuffer}
    if cfg.buffer in kinds:
        return kinds[cfg.buffer](
            cfg.budget,
            spec,
            method=cfg.method,
            iterations=cfg.iterations,
            lr_images=cfg.lr_images,
            real_per_class=cfg.real_per_class,
            storage=cfg.storage,
            downsample=cfg.downsample,
            bases=cfg.bases,
            factor=cfg.factor,
            seed=cfg.seed,
            device=cfg.device,
            progress=cfg.progress,
            options=cfg.options,
            precision=cfg.precision,
        )
    n = real_samples_for_budget(cfg.budget, spec.image_shape)
    if cfg.buffer == "replay":
        return ReservoirSamplingBuffer(n)
    if cfg.buffer == "class-balanced":
        return ClassBalancedBuffer(n, adaptive_size=True)
    if cfg.model not in _EMBEDDING_LAYER:
        raise ValueError(
            f"herding selects in a flat embedding; the {cfg.model!r} model has none: use --model "
            f"{' or '.join(_EMBEDDING_LAYER)}"
        )
    return ParametricBuffer(
        n,
        groupby="class",
        selection_strategy=HerdingSelectionStrategy(model, _EMBEDDING_LAYER[cfg.model]),
    )


def make_strategy(
    cfg: RunConfig, model: nn.Module, plugins: list[Any], storage_policy: Any = None
) -> Any:
    """The strategy over ``model`` with Avalanche's accuracy and forgetting metrics: ``ER_ACE``
    or ``DER`` with their buffer at the budget for those buffers; for strategy ``er-ace``,
    :class:`~.er_ace.MemoryER_ACE` replaying ``storage_policy``; else ``Naive`` or ``EWC``."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import DER, ER_ACE, EWC, Naive

    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[],
    )
    epochs = cfg.buffer_epochs if cfg.buffer == "gdumb" else cfg.epochs
    kwargs = dict(
        train_mb_size=cfg.train_mb_size,
        train_epochs=epochs,
        eval_mb_size=1000,
        device=cfg.device,
        evaluator=evaluator,
        plugins=plugins,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    criterion = nn.CrossEntropyLoss()
    if cfg.buffer in STRATEGY_BUFFERS:
        spec = SPECS[BENCHMARKS[cfg.benchmark]]
        # DER keeps one logit per output of the model for every sample it stores.
        logits = spec.num_classes if cfg.buffer == "der" else 0
        mem_size = real_samples_for_budget(cfg.budget, spec.image_shape, logits)
        # Both replay only once their buffer holds a whole memory batch (a drop_last loader):
        # with a memory smaller than batch_size_mem they would never replay, so the memory part
        # of each minibatch is capped at the memory's size.
        replay = dict(mem_size=mem_size, batch_size_mem=min(cfg.batch_size_mem, mem_size))
        learner = DER if cfg.buffer == "der" else ER_ACE
        return learner(model=model, optimizer=optimizer, criterion=criterion, **replay, **kwargs)
    if cfg.strategy == "er-ace":
        if storage_policy is None:
            raise ValueError("strategy 'er-ace' replays a storage policy: pass storage_policy")
        return MemoryER_ACE(
            storage_policy=storage_policy,
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            batch_size_mem=min(cfg.batch_size_mem, storage_policy.max_size),
            **kwargs,
        )
    if cfg.strategy == "ewc":
        return EWC(model, optimizer, criterion, ewc_lambda=cfg.ewc_lambda, **kwargs)
    return Naive(model, optimizer, criterion, **kwargs)


def run_stream(
    cfg: RunConfig,
    bench: ContinualBenchmark | None = None,
    on_experience: Callable[[int, RunResult, Any], None] | None = None,
    checkpoint: str | Path | None = None,
) -> RunResult:
    """Train over the whole stream, scoring the full ``bench.eval_stream`` (the test stream, or
    the validation stream of :func:`~fedcl_dd.scenarios.continual.with_validation`) after each
    experience.

    ``on_experience(i, result_so_far, strategy)`` is called after each experience (e.g. to
    print). With ``checkpoint``, the strategy is saved there after every experience through
    Avalanche's ``save_checkpoint``, and a run finding the file resumes after its last
    experience (a checkpoint of another configuration is refused). The time our memories
    take to build (initialization, matching iterations, herding) is measured inside them and
    reported apart from training time.
    """
    bench = bench or make_benchmark(cfg.benchmark, seed=cfg.seed, root=cfg.data_root)
    torch.manual_seed(cfg.seed)  # Avalanche's data loaders shuffle with the global RNG
    model = make_learner(cfg, bench.spec)
    plugins, policy = [], None
    if cfg.buffer not in STRATEGY_BUFFERS:
        plugin, policy = make_memory(cfg, bench, model)
        plugins = [plugin] if plugin is not None else []
    strategy = make_strategy(cfg, model, plugins, policy)
    strategy.fedcl_result = RunResult(config=asdict(cfg))  # travels inside the checkpoint
    start = 0
    if checkpoint is not None:
        strategy, start = resume(strategy, checkpoint)
    for exp in bench.train_stream[start:]:
        result: RunResult = strategy.fedcl_result
        memory = memories(strategy)[0]
        done = len(getattr(memory, "build_seconds", []))
        begin = time.perf_counter()
        strategy.train(exp)
        total = time.perf_counter() - begin
        built = getattr(memory, "build_seconds", [])[done:]
        result.build_seconds.append(sum(built))
        result.train_seconds.append(total - sum(built))
        metrics = strategy.eval(bench.eval_stream)
        result.accuracy_after.append(_stream_metric(metrics, "Top1_Acc_Stream", bench))
        result.forgetting = _stream_metric(metrics, "StreamForgetting", bench)
        _describe_memory(result, memory)
        if checkpoint is not None:
            save(strategy, checkpoint)
        if on_experience is not None:
            on_experience(exp.current_experience, result, strategy)
    return strategy.fedcl_result


def _stream_metric(metrics: dict[str, Any], name: str, bench: ContinualBenchmark) -> float:
    """Avalanche's stream metric ``name`` on ``bench.eval_stream`` (NaN if it has none yet,
    as forgetting before a second experience). The classic scenarios suffix the key with the
    task label; the validation stream's experiences carry none."""
    key = f"{name}/eval_phase/{bench.eval_stream_name}_stream"
    return float(metrics.get(key, metrics.get(f"{key}/Task000", float("nan"))))


def _describe_memory(result: RunResult, memory: Any) -> None:
    if isinstance(memory, MemoryBuffer):
        result.buffer_bytes, result.distinct_samples = memory.nbytes, memory.distinct_samples()
        result.iterations_per_update = list(memory.iterations_run)
        result.matching_iterations = min(memory.iterations_run, default=0)
        result.buffer_samples = len(memory.buffer)
        return
    n = len(memory.buffer)
    result.buffer_samples = result.distinct_samples = n
    if not n:
        result.buffer_bytes = 0
        return
    first = memory.buffer[0]  # (x, y, task) and, in DER's buffer, the stored logits
    logits = first[3].numel() if len(first) > 3 else 0
    result.buffer_bytes = n * sample_bytes(image_shape3(first[0].shape), logits)


def default_out(cfg: RunConfig) -> Path:
    """``runs/continual-<benchmark>-<buffer>-<bytes>B-seed<seed>``."""
    return Path("runs") / f"continual-{cfg.benchmark}-{cfg.buffer}-{cfg.budget}B-seed{cfg.seed}"
