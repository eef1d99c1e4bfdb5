"""Soft labels from a teacher trained on the real data: stored, counted, and refused when private."""

from __future__ import annotations

import pytest
import torch

from fedcl_dd.evaluate import evaluate
from fedcl_dd.pipeline import Distillation
from fedcl_dd.recipe import Recipe
from fedcl_dd.synthetic import SyntheticSet


def test_teacher_labels_are_soft_counted_in_the_bytes_and_round_trip(
    digits, digits_sampler, tmp_path
):
    hard = Distillation(Recipe(ipc=2, iterations=2), digits_sampler, digits.spec, seed=0)
    hard.run()
    run = Distillation(
        Recipe(ipc=2, iterations=2, teacher_epochs=30), digits_sampler, digits.spec, seed=0
    )
    result = run.run()
    syn = run.syn
    assert syn.label_mode == "soft" and result.report["teacher_seconds"] > 0
    targets = syn.targets().detach()
    assert torch.allclose(targets.sum(1), torch.ones(syn.num_images), atol=1e-5)
    # The labels are the teacher's, not the one-hot ones: most agree with the image's class.
    assert float(targets.max(1).values.min()) < 0.999
    assert float((targets.argmax(1) == syn.class_ids).float().mean()) >= 0.8
    # num_classes fp32 values per image on top of the hard-labelled set's bytes.
    assert syn.nbytes == hard.syn.nbytes + syn.num_images * digits.spec.num_classes * 4
    again = SyntheticSet.load(syn.save(tmp_path / "s.safetensors"))
    assert torch.allclose(again.targets(), targets)
    assert (
        evaluate(again, digits.test_x, digits.test_y, digits.spec, num_models=1, epochs=2).mean > 0
    )


def test_a_private_method_refuses_teacher_labels():
    with pytest.raises(ValueError, match="trained on the private records"):
        Recipe(method="dm-dp", init="noise", teacher_epochs=1)
    with pytest.raises(ValueError, match="teacher_epochs must be >= 0"):
        Recipe(teacher_epochs=-1)
