"""Shared fixtures: the real datasets, imported once per machine.

The real data ships beside the checkout, in ``<repo>/../shared/data`` (see its
README). ``data_root`` imports its MNIST, and ``cifar_root`` its CIFAR-10 JPEG
copy, into a cache folder outside the source tree -- ``$FEDCL_DD_DATA`` if set,
else ``<repo>/.cache/data`` (git-ignored) -- so later runs reuse the import
(:func:`fedcl_dd.data.import_data` skips what is already complete). Tests that
use them are skipped only when the shared folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedcl_dd.data import import_data

# `make test` runs the suite on pytest-xdist workers (tests that start Ray or Flower processes
# share one worker through `xdist_group("flower")`, so two Ray clusters never overlap). Give
# each worker its share of the cores, so workers do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    )

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _cache_dir() -> Path:
    env = os.environ.get("FEDCL_DD_DATA")
    return Path(env).expanduser() if env else REPO / ".cache" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only shared data folder (never write into it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (expected beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_root(shared_data: Path) -> Path:
    """A data root holding the real MNIST."""
    root = _cache_dir()
    import_data(shared_data, root, datasets=["mnist"])
    return root


@pytest.fixture(scope="session")
def cifar_root(shared_data: Path) -> Path:
    """A data root holding the real CIFAR-10 (JPEG); extracting it takes ~10 s the first time."""
    root = _cache_dir()
    import_data(shared_data, root, datasets=["cifar10"])
    return root


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits (ships with the package: no files needed)."""
    from fedcl_dd.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_sampler(digits):
    """The digits training split, grouped by class."""
    from fedcl_dd.sampling import ClassSampler

    return ClassSampler(digits.train_x, digits.train_y, digits.spec.num_classes)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many tiny steps, where a second thread only adds
    synchronization (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits16(digits):
    """Digits upsampled to 16x16 (spec, train sampler, test images, test labels).

    Gradient and trajectory matching need it: at 8x8 the ConvNet's last block instance-normalizes
    2x2 maps, which makes their losses too rough in pixel space to descend (measured: GM at the
    paper's lr 0.1 lowered accuracy from 89% to 75% at 8x8, and raised it from 91% to 95% at 16x16).
    """
    import dataclasses

    import torch.nn.functional as F

    from fedcl_dd.sampling import ClassSampler

    def up(x):
        return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)

    spec = dataclasses.replace(digits.spec, name="digits16", image_size=16)
    return (
        spec,
        ClassSampler(up(digits.train_x), digits.train_y, 10),
        up(digits.test_x),
        digits.test_y,
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Order for xdist (`--dist loadgroup` hands out tests in collection order, and a worker
    keeps about three queued): the longest tests first, each followed by two short ones,
    so that no worker queues two long tests while another runs out of work."""

    def long(item) -> bool:
        return bool(item.get_closest_marker("slow")) and not item.get_closest_marker("xdist_group")

    # Measured longest first (one thread each: about 320, 180 and 150 s).
    longest = ("test_gm_accuracy.py", "test_mnist_slow.py", "test_dm.py")
    heavy = sorted(
        (item for item in items if long(item)),
        key=lambda item: next(
            (i for i, m in enumerate(longest) if item.nodeid.startswith(f"tests/{m}")), len(longest)
        ),
    )
    rest = [item for item in items if not long(item)]
    ordered = []
    for item in heavy:
        ordered += [item, *rest[:2]]
        rest = rest[2:]
    items[:] = ordered + rest
