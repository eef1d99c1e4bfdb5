"""bfloat16 autocast on a flag: it applies where the chip computes bf16, runs distillation and
evaluation to finite results, falls back to fp32 with one warning elsewhere, and leaves the
fp32 default exactly as it was."""

import json
import warnings

import pytest
import torch
from dm_start import dm_start

from fedcl_dd import precision as precision_mod
from fedcl_dd.cli import main
from fedcl_dd.distill import DistillConfig, distill
from fedcl_dd.evaluate import evaluate, train_model
from fedcl_dd.models import make_model
from fedcl_dd.objectives import DistributionMatching
from fedcl_dd.objectives.dm_dp import PrivateDistributionMatching
from fedcl_dd.precision import Precision, autocast_context
from fedcl_dd.synthetic import PixelSet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts with no reason warned yet (the module warns once per process)."""
    monkeypatch.setattr(precision_mod, "_WARNED", set())


@pytest.fixture
def native_bf16(monkeypatch):
    """The bf16 path on any CPU: where the chip lacks bfloat16 units, CPU autocast emulates
    them (slower, the same rounding), so these tests run on every machine, not only where
    AVX512-BF16 or AMX would make the path worth taking."""
    monkeypatch.setattr(precision_mod, "_cpu_has_native_bf16", lambda: True)


def _run(digits, sampler, config, objective=None, seed=0):
    ctx, syn = dm_start(digits, sampler, seed)
    result = distill(syn, objective or DistributionMatching(16), ctx, config)
    return result, syn


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "falls back to fp32" in str(w.message)]


def test_autocast_applies_on_a_cpu_with_bf16(native_bf16):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast_context("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context("cpu"):
        assert (a @ b).dtype == torch.float32
    assert Precision.resolve("bf16", "cpu").active
    assert not Precision.resolve("fp32", "cpu").active


def test_bf16_distillation_and_evaluation_are_finite(digits, digits_sampler, native_bf16):
    result, syn = _run(digits, digits_sampler, DistillConfig(iterations=3, precision="bf16"))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # The losses were computed in bf16 (not fp32 to the bit), and close to fp32's.
    full, _ = _run(digits, digits_sampler, DistillConfig(iterations=3))
    assert result.losses != full.losses
    assert result.losses == pytest.approx(full.losses, rel=0.1)
    # S and its optimizer stay fp32 under autocast.
    assert all(p.dtype == torch.float32 for p in syn.parameters())
    assert torch.isfinite(syn.images()).all()

    ev = evaluate(syn, digits.test_x, digits.test_y, digits.spec, num_models=1, epochs=4)
    bf = evaluate(
        syn, digits.test_x, digits.test_y, digits.spec, num_models=1, epochs=4, precision="bf16"
    )
    assert 0.0 < bf.mean <= 1.0 and abs(bf.mean - ev.mean) < 0.25
    assert bf.extra == {"precision": "bf16"}


def test_fp32_default_is_bit_identical(digits, digits_sampler):
    plain, syn = _run(digits, digits_sampler, DistillConfig(iterations=3))
    named, syn2 = _run(digits, digits_sampler, DistillConfig(iterations=3, precision="fp32"))
    assert plain.losses == named.losses
    assert torch.equal(syn.images(), syn2.images())

    args = (syn, digits.test_x, digits.test_y, digits.spec)
    a = evaluate(*args, num_models=1, epochs=3)
    b = evaluate(*args, num_models=1, epochs=3, precision="fp32")
    assert a.accuracies == b.accuracies

    def trained(**kw):
        net = make_model("convnet", 1, 10, 8, torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        return train_model(net, syn.images(), syn.targets(), 2, generator=gen, **kw)

    for p, q in zip(trained().parameters(), trained(precision="fp32").parameters(), strict=True):
        assert torch.equal(p, q)


def test_unsupported_device_falls_back_with_one_warning(digits, digits_sampler, monkeypatch):
    monkeypatch.setattr(precision_mod, "_cpu_has_native_bf16", lambda: False)
    args = ((digits.train_x[:40], digits.train_y[:40]), digits.test_x, digits.test_y, digits.spec)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bf = evaluate(*args, num_models=2, epochs=2, precision="bf16")
        mode = Precision.resolve("bf16", "cpu")  # asked again in the same process: no repeat
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "lacks native bfloat16" in messages[0]
    assert not mode.active and bf.extra == {}
    # The fallback is plain fp32, to the bit.
    assert bf.accuracies == evaluate(*args, num_models=2, epochs=2).accuracies


def test_private_objective_matches_in_fp32(digits, digits_sampler):
    def private():
        return PrivateDistributionMatching(real_per_class=16, noise_multiplier=1.0)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bf, _ = _run(
            digits, digits_sampler, DistillConfig(1, lr_images=1e-3, precision="bf16"), private()
        )
    messages = _fallback_warnings(record)
    assert len(messages) == 1 and "'dm-dp'" in messages[0] and "fp32" in messages[0]
    assert all(torch.isfinite(torch.tensor(bf.losses)))


def test_cli_evaluate_takes_the_flag(tmp_path, digits_sampler):
    path = tmp_path / "s.safetensors"
    PixelSet.from_real(digits_sampler, 1, generator=torch.Generator().manual_seed(0)).save(path)
    out = tmp_path / "e.json"
    argv = ["evaluate", str(path), "--dataset", "digits", "--eval-epochs", "2"]
    assert main([*argv, "--eval-models", "1", "--precision", "bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16" and 0 <= result["accuracy_mean"] <= 1
    with pytest.raises(SystemExit) as refused:  # argparse: not one of the choices
        main([*argv, "--precision", "fp16"])
    assert refused.value.code == 2


def test_the_baselines_clients_train_under_the_run_configs_precision(monkeypatch, native_bf16):
    # FedAvg's local training takes the run config's precision, as our side does; DP-SGD
    # (Opacus's per-sample gradients) stays fp32 and says so.
    from fedcl_dd.strategies.flower import client_app
    from fedcl_dd.strategies.flower.config import FedConfig
    from flower_messages import train_in_process

    logits: list[torch.dtype] = []
    global_model = client_app._global_model

    def spied(*args):
        net = global_model(*args)
        net.register_forward_hook(lambda module, inputs, out: logits.append(out.dtype))
        return net

    monkeypatch.setattr(client_app, "_global_model", spied)
    seen = {}
    for name, extra in {"fp32": {}, "bf16": {}, "dp": {"epsilon": 8.0}}.items():
        logits.clear()
        cfg = FedConfig(
            preset="digits-iid-4",
            algorithm="fedavg",
            precision="fp32" if name == "fp32" else "bf16",
            **extra,
        )
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            reply = train_in_process(cfg)
        assert not reply.has_error(), reply.error
        seen[name] = (set(logits), _fallback_warnings(record))
    assert seen["fp32"] == ({torch.float32}, [])
    assert seen["bf16"] == ({torch.bfloat16}, [])
    dtypes, fallback = seen["dp"]
    assert dtypes == {torch.float32} and len(fallback) == 1 and "DP-SGD" in fallback[0]
