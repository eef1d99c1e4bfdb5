"""torch.compile'd matching networks (fedcl_dd.compiled) compute what eager ones do."""

from __future__ import annotations

import importlib
import shutil

import pytest
import torch

import fedcl_dd.objectives.dm as dm_module
import fedcl_dd.pool as pool_module
from fedcl_dd.compiled import compile_embedding, compiled_forward
from fedcl_dd.distill import DistillConfig
from fedcl_dd.evaluate import evaluate
from fedcl_dd.models import ConvNet, embed
from fedcl_dd.pipeline import Distillation
from fedcl_dd.privacy import PrivateRandom
from fedcl_dd.recipe import Recipe
from fedcl_dd.synthetic import PixelSet

pytestmark = pytest.mark.usefixtures("one_thread", "inductor")


@pytest.fixture(scope="module")
def inductor():
    """Skip, with the reason, where TorchInductor cannot build CPU code (no C++ toolchain)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("TorchInductor needs a C++ compiler, and this machine has none")
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4))
    except Exception as exc:  # a toolchain or header problem, whatever its type
        pytest.skip(f"TorchInductor cannot compile on this machine: {exc}")


KEY = "a test key, never a real secret"

IDM_POOL = {"pool_size": 2, "pool_init": 2, "pool_steps": 1, "pool_train_nets": 1}

# A pool network (copied and blended each iteration, then compiled) and the centered, clipped
# wrapper of dm-dp around a compiled network: the two ways a network reaches the loss. With
# each, how far the compiled run's two steps may stray from the eager run's, as a share of
# their length: floating-point sums in another order (measured: 3e-4 for dm; 1e-5 for dm-dp,
# 1.2e-3 on an AMD EPYC without AVX-512 under torch 2.14, its vector width another order),
# and how far (relative) the losses after the first may then differ.
# NCFM's phase term, sqrt(|a||b| - Re(a conj b)), cancels and then magnifies rounding: its
# steps differ by 4-6% on an Intel Xeon and by 10% on an AMD EPYC (measured) for losses equal
# to 1e-5, as eager runs do between fp32 and any other order of the same sums; a wrong
# compiled graph moves them by their whole length.
CASES = {
    "dm": ({"real_per_class": 16}, 1e-3, 1e-4),
    # NCFM's 10% steps move its second loss by 1e-3 (measured on an AMD EPYC).
    "ncfm": ({"real_per_class": 16, "num_freqs": 64, "pool_size": 2, "pool_init": 2}, 0.25, 1e-2),
    "dm-dp": ({"real_per_class": 16, "noise_multiplier": 1.0}, 5e-3, 1e-4),
    # IDM's pool networks train a step every iteration, through the compiled forward.
    "idm": ({"real_per_class": 16, **IDM_POOL}, 1e-3, 1e-4),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_compiled_run_distills_the_same_images(digits, digits_sampler, method, monkeypatch):
    options, tolerance, later = CASES[method]
    trained = []  # the modes the pool's training compiled its forward in

    def spy(mode):
        trained.append(mode)
        return compiled_forward(mode)

    monkeypatch.setattr(pool_module, "compiled_forward", spy)
    matching = []  # the modes the matching networks were compiled in

    def spy_matching(net, mode):
        matching.append(mode)
        return compile_embedding(net, mode)

    monkeypatch.setattr(dm_module, "compile_embedding", spy_matching)
    runs = {}
    for mode in (None, "default"):
        recipe = Recipe(method=method, ipc=2, iterations=2, options=options)
        # dm-dp: the same keyed private draws on both sides, so that only compilation differs.
        noise = PrivateRandom(KEY, "compiled") if method == "dm-dp" else None
        run = Distillation(
            recipe, digits_sampler, digits.spec, seed=0, compile=mode, noise_source=noise
        )
        start = run.syn.images().clone()
        runs[mode] = (run, run.run())
    (eager, eager_result), (compiled, compiled_result) = runs[None], runs["default"]
    # The first loss sees the same images through the same network: only compilation differs.
    assert compiled_result.losses[0] == pytest.approx(eager_result.losses[0], rel=1e-4)
    # Later losses see the images each run's steps made, which stray as far as `tolerance`
    # allows, so they agree within `later`.
    assert compiled_result.losses[1:] == pytest.approx(eager_result.losses[1:], rel=later)
    # Every matching network of the compiled run went through torch.compile, none of the
    # eager run's (without this, both runs could be eager and agree).
    assert matching == ["default"] * len(matching) and matching
    if method == "idm":  # a step per iteration, compiled in the compiled run only
        assert trained == ["default"] * 2
    moved = (eager.syn.images() - start).detach().norm()
    assert moved > 0
    ratio = float((compiled.syn.images() - eager.syn.images()).detach().norm() / moved)
    print(f"{method}: compiled and eager steps differ by {ratio:.1e} of their length")
    assert ratio <= tolerance


def test_a_compiled_evaluation_trains_the_same_networks(digits, digits_sampler, monkeypatch):
    # The module, not the function of the same name that fedcl_dd exports.
    evaluation = importlib.import_module("fedcl_dd.evaluate")
    compiled = []  # the networks that evaluate compiled, by mode

    def spy(net, mode):
        compiled.append(mode)
        return compile_embedding(net, mode)

    monkeypatch.setattr(evaluation, "compile_embedding", spy)
    syn = PixelSet.from_real(digits_sampler, 2, generator=torch.Generator().manual_seed(0))
    results = {
        mode: evaluate(
            syn, digits.test_x, digits.test_y, digits.spec, num_models=1, epochs=4, compile=mode
        )
        for mode in (None, "default")
    }
    assert compiled == ["default"]
    # Four SGD steps apart only by rounding: the same test predictions, bar a borderline one.
    assert abs(results["default"].mean - results[None].mean) <= 1 / len(digits.test_y)


def test_compile_embedding_routes_forward_and_embed_through_one_function(digits):
    spec = digits.spec
    nets = [ConvNet(spec.channels, spec.num_classes, spec.image_size) for _ in range(2)]
    x = torch.randn(4, *spec.image_shape)
    expected = [(net(x), embed(net, x)) for net in nets]
    for net, (logits, features) in zip(nets, expected, strict=True):
        compile_embedding(net)
        torch.testing.assert_close(net(x), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(embed(net, x), features, rtol=1e-5, atol=1e-5)
    assert nets[0].embed.func is nets[1].embed.func  # one compiled function for every network


def test_an_unknown_compile_mode_is_refused_with_the_modes():
    with pytest.raises(ValueError, match="compile must be one of .*'default'"):
        DistillConfig(compile="fast")
    with pytest.raises(ValueError, match="compile must be one of .*'default'"):
        compile_embedding(ConvNet(1, 10, 8), "fast")


def test_the_server_trains_the_global_model_compiled_as_it_would_eager(digits_sampler, monkeypatch):
    # Flower's adapter: the run config's compile also compiles the server's training.
    from fedcl_dd.strategies.flower import strategy as strategy_module
    from fedcl_dd.strategies.flower.config import FedConfig
    from fedcl_dd.strategies.flower.payload import Upload
    from fedcl_dd.strategies.flower.strategy import RoundReport, SyntheticSetStrategy

    compiled = []

    def spy(net, mode):
        compiled.append(mode)
        return compile_embedding(net, mode)

    monkeypatch.setattr(strategy_module, "compile_embedding", spy)
    syn = PixelSet.from_real(digits_sampler, 5, generator=torch.Generator().manual_seed(0))
    metrics = {"num-examples": 100, "partition-id": 0, "upload-bytes": 1, "seconds": 1.0}
    weights = {}
    for mode in ("", "default"):
        cfg = FedConfig(preset="digits-iid-4", ipc=5, server_epochs=2, compile=mode)
        arrays = SyntheticSetStrategy(cfg).train_on_pool(1, [Upload(syn, metrics)], RoundReport(1))
        assert arrays is not None
        weights[mode] = arrays.to_torch_state_dict()
    assert compiled == ["default"]
    for name, eager in weights[""].items():  # a few SGD steps apart only by rounding
        torch.testing.assert_close(weights["default"][name], eager, rtol=1e-3, atol=1e-4)


def test_the_baselines_clients_train_compiled_as_they_would_eager(monkeypatch):
    # The run config's compile reaches FedAvg's local training too: both sides equally fast.
    from fedcl_dd.strategies.flower import client_app
    from fedcl_dd.strategies.flower.config import FedConfig
    from fedcl_dd.strategies.flower.payload import ARRAYS
    from flower_messages import train_in_process

    compiled = []

    def spy(net, mode):
        compiled.append(mode)
        return compile_embedding(net, mode)

    monkeypatch.setattr(client_app, "compile_embedding", spy)
    weights = {}
    for mode in ("", "default"):
        reply = train_in_process(FedConfig(preset="digits-iid-4", algorithm="fedavg", compile=mode))
        assert not reply.has_error(), reply.error
        weights[mode] = reply.content.array_records[ARRAYS].to_torch_state_dict()
    assert compiled == ["default"]
    for name, eager in weights[""].items():  # one local epoch apart only by rounding
        torch.testing.assert_close(weights["default"][name], eager, rtol=1e-3, atol=1e-4)
