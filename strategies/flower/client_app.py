"""The ClientApp: distill the local partition and upload the synthetic set (or, as the
baseline, train the global model locally as FedAvg/FedProx clients do).

Train messages carry the global model (``"arrays"``) and the run configuration
(``"config"``, see :class:`~fedcl_dd.strategies.flower.config.FedConfig`). The client reads
its partition through :mod:`fedcl_dd.scenarios.federated` from the data root
(``node_config["data-root"]``, else ``$FEDCL_DD_DATA``, else ``~/.cache/fedcl-dd``).

Iterative mode follows FedDM (Xiong et al., "FedDM: Iterative Distribution Matching for
Communication-Efficient Federated Learning", CVPR 2023): from the second round on, the
matching networks are the current global model plus a small random perturbation, and the
synthetic set is kept (:mod:`~fedcl_dd.strategies.flower.client_state`) to warm-start the
next round.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from fedcl_dd.scenarios.federated import ClientData, client_data
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.cli import resolve_device
from fedcl_dd.compiled import compile_embedding
from fedcl_dd.evaluate import accuracy
from fedcl_dd.models import make_model
from fedcl_dd.objectives import MatchingContext, PrivateRelease
from fedcl_dd.objectives.base import NetworkSource
from fedcl_dd.pipeline import Distillation
from fedcl_dd.precision import Precision
from fedcl_dd.privacy import PrivacyBudgetError, PrivacyLedger, PrivateRandom, noise_for_target
from fedcl_dd.sampling import ClassSampler

from .client_state import ClientState
from .config import FedConfig
from .payload import ARRAYS, CONFIG, METRICS, load_model_arrays, synthetic_records
from .seeding import client_seed

__all__ = ["app", "perturbed_global"]

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[FedConfig, int, ClientData, torch.device]:
    cfg = FedConfig.from_mapping(msg.content.config_records[CONFIG], strict=False)
    if "partition-id" not in context.node_config:
        raise ValueError(
            "this SuperNode has no partition-id: start it with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        )
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config.get("num-partitions", cfg.preset_obj.num_clients))
    if n != cfg.preset_obj.num_clients:
        raise ValueError(
            f"num-partitions={n} on this node, but preset {cfg.preset} has {cfg.preset_obj.num_clients}"
        )
    root = context.node_config.get("data-root")
    torch.set_num_threads(max(1, int(context.node_config.get("threads", 1))))
    keep_freed_memory()
    return cfg, pid, client_data(cfg.preset_obj, pid, str(root) if root else None), resolve_device()


def _config_float(config: ConfigRecord, key: str) -> float:
    """A number the server put in the config; a clear error if it is missing or not a number."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"the server's config has {key}={value!r}; expected a number")
    return float(value)


def _config_int(config: ConfigRecord, key: str) -> int:
    value = _config_float(config, key)
    if not value.is_integer():
        raise ValueError(f"the server's config has {key}={value!r}; expected a whole number")
    return int(value)


def _global_model(
    cfg: FedConfig, data: ClientData, arrays: ArrayRecord, device: torch.device
) -> nn.Module:
    spec = data.spec
    net = make_model(
        cfg.model, spec.channels, spec.num_classes, spec.image_size, torch.Generator(), device
    )
    return load_model_arrays(net, arrays)


def perturbed_global(global_net: nn.Module, scale: float) -> NetworkSource:
    """FedDM's network sampler: a copy of ``global_net`` with every tensor moved by Gaussian
    noise of ``scale`` times that tensor's RMS (drawn from the context's generator)."""

    def source(ctx: MatchingContext) -> nn.Module:
        net = copy.deepcopy(global_net)
        with torch.no_grad():
            for p in net.parameters():
                noise = torch.randn(p.shape, generator=ctx.generator).to(p.device)
                p.add_(noise * p.pow(2).mean().sqrt() * scale)
        return net

    return source


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Distill the local data (synthetic) or train locally (fedavg / fedprox / fedavgm)."""
    cfg, pid, data, device = _setup(msg, context)
    server_round = _config_int(msg.content.config_records[CONFIG], "server-round")
    if cfg.algorithm == "synthetic":
        content = _distill(msg, context, cfg, pid, server_round, data, device)
    else:
        content = _local_sgd(msg, context, cfg, pid, server_round, data, device)
    return Message(content, reply_to=msg)


def _distill(
    msg: Message,
    context: Context,
    cfg: FedConfig,
    pid: int,
    server_round: int,
    data: ClientData,
    device: torch.device,
) -> RecordDict:
    start = time.perf_counter()
    spec = data.spec
    real = ClassSampler(data.train_x, data.train_y, spec.num_classes, device)
    state = ClientState(context, pid)
    syn = state.warm_start(server_round) if cfg.mode == "iterative" else None
    source = None
    if cfg.mode == "iterative" and server_round > 1 and cfg.perturb >= 0:
        source = perturbed_global(
            _global_model(cfg, data, msg.content.array_records[ARRAYS], device), cfg.perturb
        )
    run = Distillation(
        cfg.recipe(),
        real,
        spec,
        seed=client_seed(cfg.seed, server_round, pid),
        device=device,
        syn=syn,
        classes=data.classes,
        model=cfg.model,
        network_source=source,
        planned_iterations=cfg.planned_iterations,
        info={"partition-id": pid},
        noise_source=_noise_source(context, server_round, pid) if cfg.private else None,
        precision=cfg.precision,
        compile=cfg.compile or None,
    )
    syn, objective = run.syn, run.objective
    ledger_before = state.ledger()
    if cfg.private:
        if not isinstance(objective, PrivateRelease):
            raise TypeError(
                f"method {cfg.method!r} is declared private but its objective exposes no ledger, "
                "noise_multiplier and sample_rate (fedcl_dd.objectives.PrivateRelease)"
            )
        objective.ledger.load_state_dict(ledger_before.state_dict())
    result = run.run()
    if cfg.mode == "iterative":
        state.save_warm_start(syn, server_round)
    metrics: dict[str, Any] = {
        "num-examples": int(data.train_y.numel()),
        "partition-id": pid,
        "upload-bytes": int(syn.nbytes),
        "num-images": int(syn.num_images),
        "classes-held": len(data.classes),
        "seconds": time.perf_counter() - start,
        "loss-first": result.losses[0] if result.losses else float("nan"),
        "loss-last": result.losses[-1] if result.losses else float("nan"),
    }
    if isinstance(objective, PrivateRelease) and cfg.private:
        sigma, q = objective.noise_multiplier, objective.sample_rate
        assert sigma is not None and q is not None, "set by the objective's setup, which ran"
        metrics.update(
            _privacy_metrics(state, ledger_before, objective.ledger, cfg.delta, sigma, q)
        )
    else:
        metrics.update({"epsilon-round": 0.0, "epsilon-total": 0.0, "delta": 0.0})
    return synthetic_records(syn.cpu(), metrics)


def _noise_source(context: Context, server_round: int, pid: int) -> PrivateRandom:
    """The private draws of this client's release: OS entropy, or, with ``privacy-key`` in the
    node config (a secret of at least 16 bytes that only this node holds), a stream keyed by it
    and by the round and partition. Nothing the server sends can reproduce either."""
    key = context.node_config.get("privacy-key")
    if key is None:
        return PrivateRandom()
    if not isinstance(key, str):
        raise ValueError("node config privacy-key must be a string of at least 16 characters")
    return PrivateRandom(key, context=f"round {server_round} partition {pid}")


def _privacy_metrics(
    state: ClientState,
    before: PrivacyLedger,
    after: PrivacyLedger,
    delta: float,
    sigma: float,
    sample_rate: float,
) -> dict[str, float]:
    """Record ``after`` (before the reply leaves); report epsilon this round and in total, and
    the (sigma, q, steps) the server needs to account the release itself."""
    state.save_ledger(after)
    spent = before.epsilon(delta) if before.steps else 0.0
    total = after.epsilon(delta)
    return {
        "epsilon-round": total - spent,
        "epsilon-total": total,
        "delta": delta,
        "noise-multiplier": sigma,
        "sample-rate": sample_rate,
        "steps": after.steps - before.steps,
    }


def _local_sgd(
    msg: Message,
    context: Context,
    cfg: FedConfig,
    pid: int,
    server_round: int,
    data: ClientData,
    device: torch.device,
) -> RecordDict:
    """The baselines' client: SGD on the partition from the global weights (FedProx adds the
    proximal term that Flower's FedProx strategy sends as ``proximal-mu``); with ``epsilon``
    > 0, Opacus DP-SGD at a sigma planned for the whole run.

    The run config's ``precision`` and ``compile`` apply here as they do to our clients'
    distillation and the server's training, so that both sides of a comparison run at the
    same speed; DP-SGD stays fp32 and eager (Opacus computes per-sample gradients through
    hooks on the plain modules)."""
    start = time.perf_counter()
    seed = client_seed(cfg.seed, server_round, pid)
    gen = torch.Generator().manual_seed(seed)
    net = _global_model(cfg, data, msg.content.array_records[ARRAYS], device)
    mode = Precision.resolve(
        cfg.precision,
        device,
        unusable="DP-SGD's per-sample gradients (Opacus) are computed in fp32"
        if cfg.private
        else None,
    )
    if cfg.compile and cfg.private:
        warnings.warn(
            f"compile={cfg.compile!r} is not applied to DP-SGD's local training: Opacus's "
            "per-sample gradient hooks run on the eager modules",
            RuntimeWarning,
            stacklevel=2,
        )
    elif cfg.compile:
        compile_embedding(net, cfg.compile)
    anchor = [p.detach().clone() for p in net.parameters()]
    # Flower's FedProx sends its mu as "proximal-mu" (our config carries the same key for it).
    config = msg.content.config_records[CONFIG]
    mu = _config_float(config, "proximal-mu") if cfg.algorithm == "fedprox" else 0.0
    x, y = data.train_x.to(device), data.train_y.to(device)
    n = int(y.numel())
    opt = torch.optim.SGD(net.parameters(), lr=cfg.local_lr, momentum=0.9)
    metrics: dict[str, Any] = {"num-examples": n, "partition-id": pid}
    trained: nn.Module = net
    loader: Any = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True, generator=gen
    )
    if cfg.private:
        if mu > 0:
            raise ValueError(
                "DP-SGD clips per-sample gradients of the data loss only: use fedavg, not fedprox"
            )
        from opacus import PrivacyEngine

        q = min(1.0, cfg.batch_size / n)
        steps_per_round = cfg.local_epochs * math.ceil(1 / q)
        sigma = noise_for_target(cfg.epsilon, cfg.delta, q, cfg.rounds * steps_per_round)
        for module in net.modules():  # Opacus's per-sample hooks cannot follow in-place activations
            if isinstance(module, nn.ReLU):
                module.inplace = False
        engine = PrivacyEngine(accountant="rdp")
        # The Poisson sampler and the noise draw from generators whose seeds the server cannot
        # know (the loader's own generator follows the server-known client seed).
        private = _noise_source(context, server_round, pid)
        loader = torch.utils.data.DataLoader(
            loader.dataset, batch_size=cfg.batch_size, generator=private.generator()
        )
        trained, opt, loader = engine.make_private(
            module=net,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=cfg.clip,
            poisson_sampling=True,
            noise_generator=private.generator(device),
        )
        state = ClientState(context, pid)
        before = state.ledger()
        after = copy.deepcopy(before)
        after.step(sigma, q, steps_per_round)
        if after.epsilon(cfg.delta) > cfg.epsilon * (1 + 1e-9):  # e.g. a client restarted
            raise PrivacyBudgetError(
                f"this client has spent its budget epsilon={cfg.epsilon:g}: another round of "
                f"DP-SGD would bring it to {after.epsilon(cfg.delta):.4g}"
            )
        metrics.update(_privacy_metrics(state, before, after, cfg.delta, sigma, q))
    trained.train()
    for _ in range(cfg.local_epochs):
        for xb, yb in loader:
            if xb.shape[0] == 0:  # Poisson sampling can draw an empty batch
                continue
            with mode.autocast():  # the proximal term below stays fp32
                loss = F.cross_entropy(trained(xb), yb)
            if mu > 0:
                loss = loss + mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(net.parameters(), anchor, strict=True)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    arrays = ArrayRecord(net.state_dict())
    metrics.update({"upload-bytes": arrays.count_bytes(), "seconds": time.perf_counter() - start})
    return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's accuracy on this client's held-out share."""
    cfg, _, data, device = _setup(msg, context)
    net = _global_model(cfg, data, msg.content.array_records[ARRAYS], device)
    n = int(data.test_y.numel())
    acc = accuracy(net, data.test_x, data.test_y) if n else 0.0
    return Message(
        RecordDict({METRICS: MetricRecord({"accuracy": acc, "num-examples": n})}), reply_to=msg
    )
