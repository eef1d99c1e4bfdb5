"""Avalanche's own ``save_checkpoint`` / ``maybe_load_checkpoint`` with our memory replay plugin.

Real Avalanche strategies on SplitDigits (5 experiences of 2 classes), no mocks: save after
the second experience, load into a freshly built strategy, continue, and compare with the
run that was never interrupted.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import dill
import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.training.supervised import EWC, Naive
from fedcl_dd.strategies.avalanche.buffers import (
    AddressingBuffer,
    CompressedRealBuffer,
    MemoryBuffer,
    PixelBuffer,
    _OnDemand,
)
from fedcl_dd.strategies.avalanche.checkpoint import memories, resume, save
from fedcl_dd.strategies.avalanche.er_ace import MemoryER_ACE
from fedcl_dd.strategies.avalanche.plugin import MemoryReplayPlugin

from fedcl_dd.data import SPECS
from fedcl_dd.models import make_model
from fedcl_dd.synthetic import bytes_per_image

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = SPECS["digits"]
BUDGET = 20 * bytes_per_image(SPEC.image_shape)  # the bytes of 20 labelled 8x8 digits


@pytest.fixture(scope="module")
def bench() -> Any:
    from fedcl_dd.scenarios.continual import make_benchmark

    return make_benchmark("split-digits", seed=0)


def _strategy(kind: str) -> Any:
    """A freshly built strategy (same seeds every time) replaying a memory buffer."""
    model = make_model("mlp", 1, 10, 8, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    common: dict[str, Any] = dict(
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, evaluator=None
    )
    if kind == "naive-addressing":
        buffer: MemoryBuffer = AddressingBuffer(BUDGET, SPEC, iterations=2)
        plugin = MemoryReplayPlugin(buffer, batch_size_mem=16)
        return Naive(model=model, optimizer=optimizer, plugins=[plugin], **common)
    buffer = PixelBuffer(BUDGET, SPEC, iterations=3, real_per_class=32)
    if kind == "er-ace-pixels":
        return MemoryER_ACE(
            storage_policy=buffer, model=model, optimizer=optimizer, batch_size_mem=16, **common
        )
    plugin = MemoryReplayPlugin(buffer, batch_size_mem=16)
    return EWC(model=model, optimizer=optimizer, ewc_lambda=0.4, plugins=[plugin], **common)


def _weights(strategy: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}


def _memory(strategy: Any) -> dict[str, torch.Tensor]:
    buffer = memories(strategy)[0]
    return {k: v.detach().clone() for k, v in buffer.syn.state_tensors().items()}


def _momenta(strategy: Any) -> dict[str, torch.Tensor]:
    state = strategy.optimizer.state
    return {
        name: state[p]["momentum_buffer"].clone()
        for name, p in strategy.model.named_parameters()
        if p in state
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dill_copies_torch_optimizer_classes_and_fails_on_a_typing_sentinel() -> None:
    """Why the reducer in strategies/avalanche/pickling.py exists (torch 2.14, dill 0.4.1,
    typing_extensions 4.16): ``torch.optim`` deletes its submodule names, dill then cannot find
    ``torch.optim.sgd.SGD`` by name and copies the class by value, down to the namespace of
    ``typing_extensions`` (a ``deprecated`` wrapper's globals), whose ``_marker`` sentinel pickles
    as the name ``sentinel``, which is the class. When this test fails, the environment no
    longer has the problem and the reducer can go."""
    from torch.optim.sgd import SGD

    assert not hasattr(torch.optim, "sgd")  # the name dill's lookup walks through
    assert pickle.loads(pickle.dumps(SGD)) is SGD  # the standard pickle names it
    with pytest.raises(
        pickle.PicklingError, match="not the same object as typing_extensions.sentinel"
    ):
        dill.dumps(SGD)
    # With the reducer, an optimizer pickles with its class named, and comes back as one.
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    model_copy, optimizer_copy = dill.loads(dill.dumps((model, optimizer)))
    assert type(optimizer_copy) is SGD
    assert optimizer_copy.param_groups[0]["params"][0] is model_copy.weight
    assert torch.equal(
        optimizer_copy.state[model_copy.weight]["momentum_buffer"],
        optimizer.state[model.weight]["momentum_buffer"],
    )


@pytest.mark.parametrize("kind", ["naive-addressing", "ewc-pixels", "er-ace-pixels"])
def test_avalanches_own_checkpoint_resumes_bit_exactly(
    bench: Any, tmp_path: Path, kind: str
) -> None:
    """``save_checkpoint`` after experience 1, ``maybe_load_checkpoint`` into a fresh strategy,
    experience 2: weights, optimizer state and memory equal the uninterrupted run's."""
    path = tmp_path / "ckpt.pkl"
    first = _strategy(kind)
    for exp in bench.train_stream[:2]:
        first.train(exp)
    save_checkpoint(first, str(path))
    saved_weights, saved_memory, saved_momenta = _weights(first), _memory(first), _momenta(first)
    saved_digest = memories(first)[0].memory.digest
    first.train(bench.train_stream[2])
    assert not _equal(_weights(first), saved_weights)  # experience 2 did train

    restarted, start = maybe_load_checkpoint(_strategy(kind), str(path))
    assert start == 2
    assert _equal(_weights(restarted), saved_weights)
    assert _equal(_memory(restarted), saved_memory)
    assert saved_momenta and _equal(_momenta(restarted), saved_momenta)
    assert memories(restarted)[0].memory.digest == saved_digest
    assert type(restarted.optimizer) is torch.optim.SGD
    # The optimizer steps the loaded model's parameters, not copies of them.
    assert {id(p) for g in restarted.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in restarted.model.parameters()
    }
    restarted.train(bench.train_stream[start])
    assert _equal(_weights(restarted), _weights(first))
    assert _equal(_memory(restarted), _memory(first))
    assert memories(restarted)[0].classes == memories(first)[0].classes


def test_avalanches_own_load_refuses_an_altered_memory(bench: Any, tmp_path: Path) -> None:
    """A memory whose tensors no longer match their digest stops ``maybe_load_checkpoint``
    before it touches the strategy; our ``resume`` says so with the file's name."""
    strategy = _strategy("naive-addressing")
    strategy.train(bench.train_stream[0])
    bases = memories(strategy)[0].memory.syn.bases
    with torch.no_grad():
        bases.view(-1)[0] += 1.0  # as a damaged file would hold it
    save_checkpoint(strategy, str(tmp_path / "altered.pkl"))

    target = _strategy("naive-addressing")
    before = dict(target.__dict__)
    with pytest.raises(ValueError, match="AddressingBuffer: the memory's tensors differ"):
        maybe_load_checkpoint(target, str(tmp_path / "altered.pkl"))
    assert target.__dict__ == before
    with pytest.raises(ValueError, match="altered.pkl: a memory fails its check"):
        resume(target, tmp_path / "altered.pkl")
    assert target.__dict__ == before


def test_replay_is_rebuilt_from_the_verified_memory_on_load(bench: Any, tmp_path: Path) -> None:
    """The replayed dataset's own copy of the set is not what the digest covers: on load it
    is rebuilt from the verified memory, so an altered copy is never replayed."""
    strategy = _strategy("naive-addressing")
    strategy.train(bench.train_stream[0])
    buffer = memories(strategy)[0]
    held = buffer.syn.images().detach().clone()
    replayed = buffer.buffer[0][0].clone()
    (copy_of_set,) = buffer.buffer._datasets  # Avalanche's wrapper around the buffer's _OnDemand
    assert isinstance(copy_of_set, _OnDemand) and copy_of_set.syn is not buffer.syn
    with torch.no_grad():
        copy_of_set.syn.bases.mul_(2.0)
    assert not torch.equal(buffer.buffer[0][0], replayed)
    save_checkpoint(strategy, str(tmp_path / "ckpt.pkl"))

    loaded, _ = maybe_load_checkpoint(_strategy("naive-addressing"), str(tmp_path / "ckpt.pkl"))
    reloaded = memories(loaded)[0]
    assert torch.equal(reloaded.buffer[0][0], replayed)
    assert torch.allclose(torch.stack([x for x, _, _ in reloaded.buffer]), held, atol=1e-5)
    # A deep copy goes through the same check.
    assert torch.equal(copy.deepcopy(reloaded).buffer[0][0], replayed)


@pytest.mark.parametrize(
    ("buffer", "saved", "asked"),
    [
        (CompressedRealBuffer, {"factor": 2}, {"factor": 4}),
        (AddressingBuffer, {"bases": 2}, {"bases": 3}),
        (AddressingBuffer, {}, {"downsample": 2}),  # the default (None) is a setting too
        (AddressingBuffer, {"iterations": 1}, {"iterations": 2}),
        (PixelBuffer, {"real_per_class": 8}, {"real_per_class": 16}),
    ],
)
def test_a_checkpoint_of_other_memory_settings_is_refused(
    bench: Any,
    tmp_path: Path,
    buffer: type[MemoryBuffer],
    saved: dict[str, int],
    asked: dict[str, int],
) -> None:
    """Resuming keeps the checkpoint's memory, so a run asking for another ``factor``,
    ``bases``, ``downsample``, number of iterations or method option would silently run with
    the saved one: it is refused, naming the setting, and the strategy is left as it was."""

    def strategy(options: dict[str, Any]) -> Any:
        model = make_model("mlp", 1, 10, 8, torch.Generator().manual_seed(0))
        plugin = MemoryReplayPlugin(buffer(BUDGET, SPEC, **options), batch_size_mem=16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return Naive(model, optimizer, train_mb_size=16, evaluator=None, plugins=[plugin])

    path = tmp_path / "ckpt.pkl"
    first = strategy(saved)
    first.train(bench.train_stream[0])
    save(first, path)
    assert resume(strategy(saved), path)[1] == 1
    (name,) = asked
    target = strategy(asked)
    before = dict(target.__dict__)
    with pytest.raises(ValueError, match=f"another configuration \\({name}: checkpoint "):
        resume(target, path)
    assert target.__dict__ == before
