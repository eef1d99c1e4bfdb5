"""Synthetic sets: byte budgets, both parameterizations, safe and exact files."""

import pytest
import torch
from safetensors.torch import save_file

from fedcl_dd.synthetic import (
    AddressingPlan,
    AddressingSet,
    InvalidSyntheticSet,
    PixelSet,
    SyntheticSet,
    bytes_per_image,
    pixel_ipc_for_budget,
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _pixels(sampler, gen, **kw):
    return PixelSet.from_real(sampler, 3, generator=gen, info={"dataset": "digits"}, **kw)


def _addressing(sampler, spec, gen, budget_images=50, storage=torch.float32):
    budget = bytes_per_image(spec.image_shape, storage) * budget_images
    plan = AddressingPlan.for_budget(budget, 10, spec.image_shape, storage, downsample=1)
    return AddressingSet.from_real(sampler, plan, generator=gen, info={"dataset": "digits"}), budget


@pytest.mark.parametrize("shape,classes", [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 10)])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_addressing_memory_fits_the_budget_and_holds_more_images(shape, classes, ipc):
    budget = bytes_per_image(shape) * ipc * classes
    plan = AddressingPlan.for_budget(budget, classes, shape, downsample=1 if shape[1] == 8 else 2)
    assert plan.nbytes <= budget
    assert plan.per_class > pixel_ipc_for_budget(budget, classes, shape) == ipc


def test_paper_example_cifar10_one_image_per_class():
    # Deng & Russakovsky: CIFAR-10 at the floats of 1 image per class, K=16, ds=2 -> r = 115.
    plan = AddressingPlan.for_budget(
        4 * 3072 * 10 + 2 * 10, 10, (3, 32, 32), bases=16, downsample=2
    )
    assert plan.per_class == 115


def test_addressing_set_nbytes_is_what_it_stores(digits_sampler, digits, gen):
    syn, budget = _addressing(digits_sampler, digits.spec, gen)
    assert syn.nbytes <= budget
    assert syn.nbytes == sum(t.numel() * t.element_size() for t in syn.state_tensors().values())
    assert syn.num_images > 50
    images, targets = syn()
    assert images.shape == (syn.num_images, 1, 8, 8)
    assert targets.tolist() == sorted(targets.tolist())  # class-major
    assert syn.counts().tolist() == [syn.per_class] * 10


def test_gradients_reach_bases_and_addresses(digits_sampler, digits, gen):
    syn, _ = _addressing(digits_sampler, digits.spec, gen)
    syn.images().square().mean().backward()
    assert syn.bases.grad.abs().sum() > 0
    assert syn.addresses.grad.abs().sum() > 0


def test_addressing_starts_close_to_real_images(digits_sampler, digits, gen):
    # Each initial image is a real image projected onto the bases: far closer to the data
    # than noise of the same scale.
    syn, _ = _addressing(digits_sampler, digits.spec, gen)
    x = syn.images().detach()
    real = digits_sampler.x
    nearest = torch.cdist(x.flatten(1), real.flatten(1)).min(1).values
    noise = torch.cdist(torch.randn_like(x).flatten(1), real.flatten(1)).min(1).values
    assert nearest.median() < 0.5 * noise.median()


def test_budget_too_small_is_refused():
    with pytest.raises(ValueError, match="too small for one image per class.*raise --budget-bytes"):
        pixel_ipc_for_budget(1000, 10, (1, 28, 28))
    with pytest.raises(ValueError, match="too small for an addressing memory"):
        AddressingPlan.for_budget(500, 10, (1, 28, 28))


def test_fp16_storage_halves_the_image_bytes(digits_sampler, gen):
    a = _pixels(digits_sampler, gen)
    b = _pixels(digits_sampler, gen, storage_dtype=torch.float16)
    assert b.nbytes - 2 * b.num_images == (a.nbytes - 2 * a.num_images) // 2


@pytest.mark.parametrize("kind", ["pixels", "addressing", "soft"])
def test_save_load_round_trip_is_exact(kind, digits_sampler, digits, gen, tmp_path):
    if kind == "addressing":
        syn, _ = _addressing(digits_sampler, digits.spec, gen)
    else:
        syn = _pixels(digits_sampler, gen)
        if kind == "soft":
            syn.make_labels_learnable()
            with torch.no_grad():
                syn.label_logits.add_(torch.randn(syn.label_logits.shape, generator=gen))
    path = syn.save(tmp_path / "s.safetensors")
    back = SyntheticSet.load(path)
    assert type(back) is type(syn) and back.label_mode == syn.label_mode
    assert back.info == syn.info and back.num_classes == syn.num_classes
    for key, t in syn.state_tensors().items():
        assert torch.equal(back.state_tensors()[key], t), key
    assert torch.equal(back.images(), syn.images())
    assert torch.equal(back.targets(), syn.targets())


def test_fp16_round_trip_keeps_the_stored_values(digits_sampler, gen, tmp_path):
    syn = _pixels(digits_sampler, gen, storage_dtype=torch.float16)
    back = SyntheticSet.load(syn.save(tmp_path / "h.safetensors"))
    assert back.storage_dtype == torch.float16
    assert torch.equal(back.images(), syn.images().detach().half().float())


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "break_it,message",
    [
        (lambda t, m: m.update(format="something-else"), "not a synthetic set"),
        (lambda t, m: m.update(kind="voxels"), "unknown kind"),
        (lambda t, m: t.pop("labels"), "missing \\['labels'\\]"),
        (lambda t, m: t.update(extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (lambda t, m: t["images"].__setitem__((0, 0, 0, 0), float("nan")), "NaN or Inf"),
        (lambda t, m: t["labels"].__setitem__(0, 12), "outside \\[0, 10\\)"),
        (
            lambda t, m: t.update(images=t["images"][:, :, :4].contiguous()),
            "must be float \\(N, 1, 8, 8\\)",
        ),
        (lambda t, m: t.update(labels=t["labels"][:3]), "images but 3 labels"),
        (lambda t, m: t.update(images=t["images"].double()), "dtype torch.float64"),
        (lambda t, m: m.update(num_classes="ten"), "malformed metadata"),
        (lambda t, m: m.update(version="2"), "format version 2, newer .* upgrade fedcl-dd"),
        (lambda t, m: m.update(version="1.x"), "malformed format version"),
    ],
)
def test_malformed_files_are_refused_with_the_reason(
    break_it, message, digits_sampler, gen, tmp_path
):
    syn = _pixels(digits_sampler, gen)
    tensors, meta = syn.state_tensors(), syn.metadata()
    break_it(tensors, meta)
    path = _write(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(InvalidSyntheticSet, match=message):
        SyntheticSet.load(path)


def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x80\x04\x95 pickled? no thanks" * 10)
    with pytest.raises(InvalidSyntheticSet, match="not a readable safetensors file"):
        SyntheticSet.load(path)


def test_limits_on_images_and_bytes(digits_sampler, gen):
    syn = _pixels(digits_sampler, gen)
    tensors, meta = syn.state_tensors(), syn.metadata()
    SyntheticSet.from_state(tensors, meta, max_bytes=syn.nbytes, max_images=30)
    with pytest.raises(InvalidSyntheticSet, match="exceed the budget"):
        SyntheticSet.from_state(tensors, meta, max_bytes=syn.nbytes - 1)
    with pytest.raises(InvalidSyntheticSet, match="30 images exceed the limit of 29"):
        SyntheticSet.from_state(tensors, meta, max_images=29)


def test_save_is_atomic_and_keeps_the_old_file_on_failure(
    digits_sampler, gen, tmp_path, monkeypatch
):
    """The new bytes are written in full, then the rename into place fails: the old file is
    still there, whole, and no temporary file is left (a save that wrote in place would
    have replaced it)."""
    syn = _pixels(digits_sampler, gen)
    path = syn.save(tmp_path / "s.safetensors")
    before = path.read_bytes()
    with torch.no_grad():
        for param in syn.parameters():
            param.add_(0.5)  # other content, so an in-place write would show

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("fedcl_dd.io.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        syn.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_atomic_write_keeps_the_old_file_when_writing_fails_midway(tmp_path):
    from fedcl_dd.io import atomic_write

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new but incomplete")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
