"""Trajectory matching (MTT) and its constant-memory variant (TESLA) with the real ConvNet.

The digits are upsampled to 16x16 here. At 8x8 the ConvNet's third block instance-normalizes
2x2 maps (four values per channel), which makes the unrolled student's end point so rough in
the pixels that a step of norm 0.05 along the exact gradient already raised the loss in a
4-step unroll; at 16x16 the loss falls smoothly along it (measured before writing these tests).
"""

from __future__ import annotations

import copy
import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from fedcl_dd.augment import DSA
from fedcl_dd.data import load_dataset
from fedcl_dd.distill import DistillationDiverged, DistillConfig, distill
from fedcl_dd.objectives import tm as tm_module
from fedcl_dd.objectives.base import MatchingContext
from fedcl_dd.objectives.tm import TrajectoryMatching
from fedcl_dd.sampling import ClassSampler
from fedcl_dd.synthetic import AddressingPlan, AddressingSet, PixelSet

SIZE = 16
# One expert, two epochs, one possible segment (start 0 -> epoch 2): every iteration chases the
# same target, so the loss is a function of the synthetic set alone.
EXPERTS = dict(
    num_experts=1, expert_train_epochs=2, expert_epochs=2, max_start_epoch=0, expert_augment=False
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    ds = load_dataset("digits")
    keep = torch.cat([torch.nonzero(ds.train_y == c).flatten()[:30] for c in range(10)])
    x = F.interpolate(ds.train_x[keep], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    spec = dataclasses.replace(ds.spec, name=f"digits{SIZE}", image_size=SIZE)
    return spec, ClassSampler(x, ds.train_y[keep], 10)


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("experts")


def context(data, seed: int = 0, augment: bool = False) -> MatchingContext:
    spec, real = data
    aug = DSA(spec.dsa_strategy, generator=torch.Generator().manual_seed(seed)) if augment else None
    return MatchingContext(real, spec, augment=aug, generator=torch.Generator().manual_seed(seed))


def pixel_set(data, ipc: int = 2, seed: int = 0) -> PixelSet:
    return PixelSet.from_real(data[1], ipc, generator=torch.Generator().manual_seed(seed))


def objective(expert_dir, **kwargs) -> TrajectoryMatching:
    return TrajectoryMatching(**{**EXPERTS, "expert_dir": expert_dir, **kwargs})


def test_experts_are_cached_once_and_reused(data, tmp_path, monkeypatch):
    ctx, syn = context(data), pixel_set(data)
    first = objective(tmp_path)
    first.setup(ctx, syn)
    path = first.expert_path(ctx)
    assert path is not None and path.is_file() and list(tmp_path.iterdir()) == [path]
    with safe_open(str(path), framework="pt") as f:  # safetensors, keyed expert/epoch/parameter
        assert len(f.keys()) == 3 * len(list(ctx.fresh_network().parameters()))
    stamp = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the experts were trained again instead of loaded from the cache")

    monkeypatch.setattr(tm_module, "train_experts", no_training)
    second = objective(tmp_path)
    second.setup(ctx, syn)
    assert path.stat().st_mtime_ns == stamp
    # One expert, start 0: both pick the same segment, which must hold the same parameters.
    a, b = first.network(ctx), second.network(ctx)
    assert torch.equal(a.start, b.start) and torch.equal(a.target, b.target)
    assert objective(tmp_path, expert_seed=1).expert_path(ctx) != path  # other experts, other file
    path.unlink()
    second.setup(
        ctx, syn
    )  # the same objective again (e.g. the next federated round): kept in memory
    assert not path.exists()


@pytest.mark.parametrize("constant_memory", [False, True])
def test_loss_falls_over_a_short_distillation(data, expert_dir, constant_memory):
    # MTT's image and step-size learning rates (100, 1e-5). Measured over 3 seeds, both modes:
    # 0.54-0.63 at iteration 1, 0.18-0.22 at iteration 8 (last/first 3-mean ratio ~0.53).
    tm = objective(expert_dir, syn_steps=4, lr_teacher=0.01, constant_memory=constant_memory)
    result = distill(pixel_set(data), tm, context(data), DistillConfig(iterations=8, lr_images=100))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.7 * first, result.losses
    assert tm.report()["syn_lr"] != 0.01  # the step size learned too


def gradients(data, expert_dir, constant_memory: bool, syn, steps: int = 3, **kwargs):
    """Loss value and gradients of one iteration from the same expert segment, batches and
    per-sample DSA draws (TESLA's second pass must replay its first pass's draws)."""
    tm = objective(
        expert_dir,
        syn_steps=steps,
        batch_syn=10,
        lr_teacher=0.01,
        constant_memory=constant_memory,
        **kwargs,
    )
    ctx = context(data, seed=3, augment=True)
    tm.setup(ctx, syn)
    syn = copy.deepcopy(syn)
    loss = tm.loss(ctx, tm.network(ctx), syn)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in syn.named_parameters()}
    return float(loss.detach()), grads, float(tm.syn_lr.grad)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_tesla_is_close_to_the_full_unroll(data, expert_dir):
    # Measured at 3 steps (batch 10 of 20 images, step size 0.01, DSA): the same loss to 6
    # digits (0.684702), image-gradient cosine 0.954 (relative difference 0.33), step-size
    # gradient 77.6 vs 72.1. Not 1: TESLA drops later steps' dependence on earlier images.
    # (With MTT's default step size 0.001 the cosine is 0.9995 at 3 steps, 0.998 at 10 and
    # 0.990 at 30.)
    syn = pixel_set(data)
    loss_full, full, lr_full = gradients(data, expert_dir, False, syn)
    loss_tesla, tesla, lr_tesla = gradients(data, expert_dir, True, syn)
    assert loss_tesla == pytest.approx(loss_full, rel=1e-5)
    assert cosine(tesla["pixels"], full["pixels"]) > 0.9
    assert not torch.allclose(tesla["pixels"], full["pixels"], rtol=1e-3, atol=0)
    assert lr_tesla == pytest.approx(lr_full, rel=0.2)
    # One step has no earlier images to drop: there TESLA is exact.
    _, full1, _ = gradients(data, expert_dir, False, syn, steps=1)
    _, tesla1, _ = gradients(data, expert_dir, True, syn, steps=1)
    assert torch.allclose(tesla1["pixels"], full1["pixels"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("constant_memory", [False, True])
def test_gradients_reach_addressing_memory_and_soft_labels(data, expert_dir, constant_memory):
    spec, real = data
    plan = AddressingPlan(
        bases=4, per_class=2, downsample=2, num_classes=10, image_shape=spec.image_shape
    )
    syn = AddressingSet.from_real(real, plan, generator=torch.Generator().manual_seed(0))
    syn.make_labels_learnable()
    _, grads, lr_grad = gradients(data, expert_dir, constant_memory, syn)
    for name in ("bases", "addresses", "label_logits"):
        assert torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    assert lr_grad != 0


class SavedTensorPeak:
    """Peak bytes of tensors saved for backward and alive at once (through saved_tensors_hooks).

    Each saved tensor is wrapped in a box whose finalizer subtracts its bytes when autograd
    drops it (after a backward pass, or when its graph is garbage).
    """

    class _Box:
        __slots__ = ("__weakref__", "tensor")

        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    def __init__(self) -> None:
        self.live = self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def pack(self, tensor: torch.Tensor) -> _Box:
        nbytes = tensor.numel() * tensor.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        box = self._Box(tensor)
        weakref.finalize(box, self._release, nbytes)
        return box

    @staticmethod
    def unpack(box: _Box) -> torch.Tensor:
        return box.tensor


def saved_peak(data, expert_dir, constant_memory: bool, steps: int) -> int:
    tm = objective(expert_dir, syn_steps=steps, batch_syn=5, constant_memory=constant_memory)
    ctx, syn = context(data), pixel_set(data)
    tm.setup(ctx, syn)
    net = tm.network(ctx)
    meter = SavedTensorPeak()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        tm.loss(ctx, net, syn).backward()
    return meter.peak


def test_constant_memory_is_flat_in_syn_steps(data, expert_dir):
    # Measured (batch 5 of 20 16x16 images), syn_steps 1/5/10/20/40: full unroll 12.6 / 58.3 /
    # 115.4 / 229.7 / 458.3 MiB; TESLA 11.4 MiB throughout.
    peaks = {(cm, s): saved_peak(data, expert_dir, cm, s) for cm in (False, True) for s in (5, 40)}
    assert peaks[True, 40] <= 1.3 * peaks[True, 5], peaks
    assert peaks[False, 40] >= 3 * peaks[False, 5], peaks


@pytest.mark.parametrize("value", [-1e-4, 0.0, float("nan")])
def test_step_size_guard_names_the_iteration(data, expert_dir, value):
    tm = objective(expert_dir, syn_steps=1)
    ctx, syn = context(data), pixel_set(data)
    tm.setup(ctx, syn)
    net = tm.network(ctx)
    with torch.no_grad():
        tm.syn_lr.fill_(value)
    with pytest.raises(DistillationDiverged, match=r"step size is .* at iteration 1 .*lower lr_lr"):
        tm.loss(ctx, net, syn)


def test_step_size_is_learned_checkpointed_and_reported(data, expert_dir):
    tm = objective(expert_dir, lr_lr=3e-5, lr_teacher=0.02)
    (group,) = tm.parameter_groups()
    assert group["lr"] == 3e-5 and group["params"] == [tm.syn_lr]
    state = tm.state_dict()
    held = tm.syn_lr
    other = objective(expert_dir)
    other.load_state_dict(state)
    assert other.report()["syn_lr"] == pytest.approx(0.02)
    tm.load_state_dict({"syn_lr": torch.tensor(0.5), "iteration": 7})
    assert tm.syn_lr is held and float(held.detach()) == 0.5 and tm.iteration == 7
    with pytest.raises(ValueError, match="exceeds"):
        TrajectoryMatching(max_start_epoch=20, expert_epochs=2, expert_train_epochs=10)
