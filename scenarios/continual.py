"""Class-incremental streams that run offline from the data root.

* ``split-digits``: scikit-learn's 8x8 digits through Avalanche's ``nc_benchmark``
  (needs no files; the fast stream of the tests);
* ``split-mnist``: Avalanche's own ``SplitMNIST`` on the uncompressed idx files in
  ``<root>/MNIST/raw`` (:func:`prepare_mnist_raw` decompresses gzipped copies there);
* ``split-cifar10``: ``nc_benchmark`` over the JPEG ``ImageFolder`` copy in
  ``<root>/cifar10-jpg`` (Avalanche's ``SplitCIFAR10`` cannot read it).

Every stream has 5 experiences of 2 classes by default, a class order fixed by the
seed (:func:`class_order`), no task labels, and inputs normalized with the
dataset's :class:`~fedcl_dd.data.DatasetSpec` statistics, the space the core's
synthetic sets live in. Avalanche is imported here; the core never imports it.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.data import TensorDataset

from fedcl_dd.data import (
    CIFAR_JPG,
    MNIST_FILES,
    MNIST_RAW,
    SPECS,
    DatasetNotFoundError,
    DatasetSpec,
    data_root,
    load_dataset,
)
from fedcl_dd.io import atomic_write

__all__ = [
    "BENCHMARKS",
    "ContinualBenchmark",
    "class_order",
    "make_benchmark",
    "prepare_mnist_raw",
    "with_validation",
]

BENCHMARKS = {"split-digits": "digits", "split-mnist": "mnist", "split-cifar10": "cifar10"}


@dataclass
class ContinualBenchmark:
    """An Avalanche class-incremental scenario with the facts the buffers need.

    ``eval_stream`` is what a run is scored on: the test stream, or for a benchmark made by
    :func:`with_validation` the validation stream carved from the training data, so that a
    choice made on it never sees a test sample.
    """

    name: str
    spec: DatasetSpec
    scenario: Any  # avalanche NCScenario: .train_stream, .test_stream (and .valid_stream)
    class_order: list[int]
    eval_stream_name: str = "test"

    @property
    def train_stream(self) -> Any:
        return self.scenario.train_stream

    @property
    def test_stream(self) -> Any:
        return self.scenario.test_stream

    @property
    def eval_stream(self) -> Any:
        return self.scenario.streams[self.eval_stream_name]


def with_validation(
    bench: ContinualBenchmark, fraction: float = 0.1, seed: int = 0
) -> ContinualBenchmark:
    """``bench`` with ``fraction`` of each experience's training samples, per class, held out
    as a validation stream, which becomes its ``eval_stream``; the train stream keeps the rest.

    The split is Avalanche's own class-balanced one, drawn from a generator seeded by
    ``seed`` (the global RNG is left as it was). The test stream is kept but never scored.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    from avalanche.benchmarks.scenarios.dataset_scenario import split_validation_class_balanced
    from avalanche.benchmarks.scenarios.validation_scenario import benchmark_with_validation_stream

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the split shuffles with torch's global generator
        scenario = benchmark_with_validation_stream(
            bench.scenario,
            split_strategy=lambda data: split_validation_class_balanced(fraction, data),
        )
    for exp in scenario.valid_stream:
        if len(exp.dataset) == 0:
            raise ValueError(
                f"a validation fraction of {fraction} leaves experience {exp.current_experience} "
                "without validation samples; raise the fraction"
            )
    return ContinualBenchmark(bench.name, bench.spec, scenario, bench.class_order, "valid")


class _LabelledTensors(TensorDataset):
    """Images and labels with the ``targets`` list that Avalanche's ``nc_benchmark`` reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def class_order(seed: int, num_classes: int = 10) -> list[int]:
    """The class order of a stream: a permutation drawn from ``torch.Generator().manual_seed(seed)``."""
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def prepare_mnist_raw(root: str | Path | None = None) -> Path:
    """Make sure ``<root>/MNIST/raw`` holds the four *uncompressed* idx files SplitMNIST reads.

    Gzipped copies (``*-ubyte.gz``) found there are decompressed beside themselves
    (atomically); nothing outside the data root is written. Returns the data root.
    Raises :class:`~fedcl_dd.data.DatasetNotFoundError` naming the missing files.
    """
    root = data_root(root)
    raw = root / MNIST_RAW
    missing = []
    for name in MNIST_FILES:
        target, packed = raw / name, raw / f"{name}.gz"
        if target.is_file():
            continue
        if packed.is_file():

            def unpack(f: BinaryIO, packed: Path = packed) -> None:
                with gzip.open(packed, "rb") as src:
                    shutil.copyfileobj(src, f)

            atomic_write(target, unpack)
        else:
            missing.append(target)
    if missing:
        raise DatasetNotFoundError(
            "SplitMNIST needs the uncompressed MNIST idx files; missing:\n"
            + "\n".join(f"  {p}" for p in missing)
            + "\nFill the data root with `fedcl-dd data import /path/to/shared/data`."
        )
    return root


def _normalize_transform(spec: DatasetSpec, to_tensor: bool) -> Any:
    from torchvision import transforms

    steps = [transforms.ToTensor()] if to_tensor else []  # Avalanche's MNIST already yields tensors
    return transforms.Compose([*steps, transforms.Normalize(spec.mean, spec.std)])


def make_benchmark(
    name: str, seed: int = 0, root: str | Path | None = None, n_experiences: int = 5
) -> ContinualBenchmark:
    """Build ``split-digits``, ``split-mnist`` or ``split-cifar10`` with the class order of ``seed``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    spec = SPECS[BENCHMARKS[name]]
    if n_experiences < 1 or spec.num_classes % n_experiences:
        raise ValueError(
            f"n_experiences must divide the {spec.num_classes} classes of {name}, got {n_experiences}"
        )
    order = class_order(seed, spec.num_classes)
    from avalanche.benchmarks import nc_benchmark

    common = dict(seed=seed, fixed_class_order=order)
    if name == "split-digits":
        data = load_dataset("digits")
        train = _LabelledTensors(data.train_x, data.train_y)
        test = _LabelledTensors(data.test_x, data.test_y)
        scenario = nc_benchmark(train, test, n_experiences, task_labels=False, **common)
    elif name == "split-mnist":
        from avalanche.benchmarks.classic import SplitMNIST

        transform = _normalize_transform(spec, to_tensor=False)
        scenario = SplitMNIST(
            n_experiences,
            dataset_root=prepare_mnist_raw(root),
            train_transform=transform,
            eval_transform=transform,
            **common,
        )
    else:
        from torchvision.datasets import ImageFolder

        jpg = data_root(root) / CIFAR_JPG
        if not ((jpg / "train").is_dir() and (jpg / "test").is_dir()):
            raise DatasetNotFoundError(
                f"SplitCIFAR-10 reads the JPEG copy {jpg}/{{train,test}}/<class>/*.jpg, which is missing; "
                "fill the data root with `fedcl-dd data import /path/to/shared/data`"
            )
        train, test = ImageFolder(str(jpg / "train")), ImageFolder(str(jpg / "test"))
        if tuple(train.classes) != spec.class_names:
            raise ValueError(
                f"{jpg / 'train'} has class folders {train.classes}; expected {list(spec.class_names)}"
            )
        transform = _normalize_transform(spec, to_tensor=True)
        scenario = nc_benchmark(
            train,
            test,
            n_experiences,
            task_labels=False,
            train_transform=transform,
            eval_transform=transform,
            **common,
        )
    return ContinualBenchmark(name, spec, scenario, order)
