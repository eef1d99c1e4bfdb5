"""Dataset roots, loaders and the offline import (fedcl_dd.data)."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcl_dd.data import (
    MNIST_FILES,
    SPECS,
    ChecksumError,
    DatasetNotFoundError,
    data_root,
    holdout,
    import_data,
    load_dataset,
)

# Per-class sample counts of the original MNIST files.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
    """An idx (ubyte) file holding ``array``, as MNIST's files do."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _fake_mnist_source(folder: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """A tiny source folder laid out like shared/data, with MNIST only, plus SHA256SUMS."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    lines = []
    for name, array in arrays.items():
        blob = gzip.compress(_idx_bytes(array))
        (raw / f"{name}.gz").write_bytes(blob)
        lines.append(f"{hashlib.sha256(blob).hexdigest()}  MNIST/raw/{name}.gz")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder


def _fake_cifar_source(folder: Path, per_class: dict[str, int]) -> Path:
    """A source folder holding a small cifar10-jpg.tar.gz in the shipped layout."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tarfile.open(folder / "cifar10-jpg.tar.gz", "w:gz") as tar:
        for split, n in per_class.items():
            for name in SPECS["cifar10"].class_names:
                for i in range(n):
                    buf = io.BytesIO()
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buf, format="JPEG", quality=75)
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return folder


def _no_partial_files(root: Path) -> bool:
    return not any(p.name.endswith(".part") for p in root.rglob("*"))


# --------------------------------------------------------------------------- data_root


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDCL_DD_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("FEDCL_DD_DATA")
    assert data_root() == tmp_path / "xdg" / "fedcl-dd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "fedcl-dd"


# --------------------------------------------------------------------------- digits


def test_digits_shapes_balance_and_normalization() -> None:
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1347, 1, 8, 8) and ds.test_x.shape == (450, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    for y, n in ((ds.train_y, len(ds.train_y)), (ds.test_y, len(ds.test_y))):
        counts = torch.bincount(y, minlength=10).float()
        assert counts.min() >= 0.9 * n / 10 and counts.max() <= 1.1 * n / 10
    # SPECS["digits"] holds the train split's statistics.
    assert abs(ds.train_x.mean().item()) < 1e-3
    assert abs(ds.train_x.std().item() - 1.0) < 1e-3
    assert ds.extra["source"] == "sklearn-digits"


def test_digits_split_is_deterministic() -> None:
    """The split is pinned: the same labels in the same order on every machine and version
    (a digest of both splits' labels, and the first test labels in the clear)."""
    import hashlib

    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert (len(a.train_y), len(a.test_y)) == (1347, 450)
    assert a.test_y[:10].tolist() == [1, 5, 9, 2, 4, 5, 6, 7, 9, 3]
    labels = a.test_y.numpy().tobytes() + a.train_y.numpy().tobytes()
    assert hashlib.sha256(labels).hexdigest()[:16] == "e9414b16f7abebea"


def test_unknown_dataset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="digits, mnist, cifar10"):
        load_dataset("imagenet")


def test_holdout_is_class_balanced_disjoint_and_drops_the_test_split() -> None:
    ds = load_dataset("digits")
    val = holdout(ds, 0.2, seed=0)
    # Every training image lands on exactly one side; none of the real test split remains.
    assert len(val.train_y) + len(val.test_y) == len(ds.train_y)
    rows = {tuple(x.flatten().tolist()) for x in ds.train_x}
    assert {tuple(x.flatten().tolist()) for x in val.test_x} <= rows
    assert {tuple(x.flatten().tolist()) for x in val.train_x} | {
        tuple(x.flatten().tolist()) for x in val.test_x
    } == rows
    per_class = torch.bincount(ds.train_y, minlength=10)
    held = torch.bincount(val.test_y, minlength=10)
    assert torch.equal(held, (0.2 * per_class).round().long())
    # The same seed holds out the same images; another seed others.
    assert torch.equal(holdout(ds, 0.2, seed=0).test_x, val.test_x)
    assert not torch.equal(holdout(ds, 0.2, seed=1).test_x, val.test_x)
    with pytest.raises(ValueError, match="fraction"):
        holdout(ds, 1.0, seed=0)


# --------------------------------------------------------------------------- missing data


def test_missing_mnist_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", root=tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    for name in MNIST_FILES:
        assert str(tmp_path / "MNIST" / "raw" / name) in message
    assert "fedcl-dd data import" in message and "download=True" in message


def test_missing_cifar_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar10-jpg" / "train") in message
    assert str(tmp_path / "cifar10-jpg" / "test") in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "fedcl-dd data import" in message


# --------------------------------------------------------------------------- import (synthetic)


def test_import_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_data(tmp_path / "nowhere", tmp_path / "root")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar10-jpg.tar.gz") as err:
        import_data(tmp_path / "empty", tmp_path / "root")
    assert "MNIST/raw" in str(err.value)
    src = _fake_mnist_source(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="cifar10"):
        import_data(src, tmp_path / "root", datasets=["cifar10"])
    with pytest.raises(ValueError, match="never written"):
        import_data(src, src / "inside")
    with pytest.raises(ValueError, match="importable"):
        import_data(src, tmp_path / "root", datasets=["svhn"])


def test_import_is_atomic_idempotent_and_repairs(tmp_path: Path) -> None:
    src = _fake_mnist_source(tmp_path / "src")
    root = tmp_path / "root"
    raw = root / "MNIST" / "raw"
    assert import_data(src, root) == [raw / name for name in MNIST_FILES]
    assert import_data(src, root) == []
    # A truncated file (say, copied by hand and interrupted) is detected and rewritten.
    target = raw / "train-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:100])
    assert import_data(src, root) == [target]
    assert _no_partial_files(root)
    ds = load_dataset("mnist", root=root)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_y.tolist() == list(range(10))


def test_bad_checksum_is_refused(tmp_path: Path) -> None:
    src = _fake_mnist_source(tmp_path / "src")
    sums = (src / "SHA256SUMS").read_text().replace("t10k-labels", "X").splitlines()
    sums.append("0" * 64 + "  MNIST/raw/t10k-labels-idx1-ubyte.gz")
    (src / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    root = tmp_path / "root"
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        import_data(src, root)
    assert not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()
    assert _no_partial_files(root)


def test_cifar_jpeg_import_load_and_cache(tmp_path: Path) -> None:
    src = _fake_cifar_source(tmp_path / "src", {"train": 3, "test": 1})
    root = tmp_path / "root"
    assert import_data(src, root) == [root / "cifar10-jpg"]
    assert import_data(src, root) == []
    assert (root / "cifar10-jpg" / "train" / "truck" / "0002.jpg").is_file()

    first = load_dataset("cifar10", root=root)
    assert first.train_x.shape == (30, 3, 32, 32) and first.test_x.shape == (10, 3, 32, 32)
    assert first.train_y.tolist() == [c for c in range(10) for _ in range(3)]  # sorted class names
    assert first.extra == {"source": "cifar10-jpg", "root": str(root), "from_cache": False}
    cache = root / "cifar10-jpg" / "cache"
    expected = ["test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    assert sorted(p.name for p in cache.iterdir()) == expected

    # The cache alone suffices, and gives the same tensors.
    shutil.rmtree(root / "cifar10-jpg" / "train")
    second = load_dataset("cifar10", root=root)
    assert second.extra["from_cache"] is True
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)

    # A changed archive replaces the old copy and, with it, the stale cache.
    _fake_cifar_source(tmp_path / "src", {"train": 2, "test": 1})
    assert import_data(src, root) == [root / "cifar10-jpg"]
    assert not cache.exists()
    assert load_dataset("cifar10", root=root).train_x.shape[0] == 20
    assert _no_partial_files(root)


def test_cifar_prefers_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With torchvision's batches present, they are read instead of the JPEG copy."""
    import torchvision.datasets

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 4 if train else 2
            self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)
            self.targets = [0] * n

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.extra["source"] == "cifar-10-batches-py"
    assert ds.train_x.shape == (4, 3, 32, 32) and ds.test_y.dtype == torch.int64


# --------------------------------------------------------------------------- real data


def test_real_mnist_import_and_load(data_root: Path, shared_data: Path) -> None:
    assert import_data(shared_data, data_root, datasets=["mnist"]) == []  # already complete
    ds = load_dataset("mnist", root=data_root)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert torch.bincount(ds.train_y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(ds.test_y).tolist() == MNIST_TEST_COUNTS
    assert abs(ds.train_x.mean().item()) < 0.01 and abs(ds.train_x.std().item() - 1) < 0.01


@pytest.mark.slow
def test_real_cifar_import_and_load(cifar_root: Path) -> None:
    """First load decodes 60k JPEGs (~20 s) unless an earlier run cached them."""
    first = load_dataset("cifar10", root=cifar_root)
    assert first.extra["source"] == "cifar10-jpg"
    assert first.train_x.shape == (50000, 3, 32, 32) and first.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(first.train_y).tolist() == [5000] * 10
    assert torch.bincount(first.test_y).tolist() == [1000] * 10
    # Per-channel means land near 0 with CIFAR-10's usual mean (JPEG shifts them slightly).
    assert first.train_x.mean(dim=(0, 2, 3)).abs().max() < 0.02
    start = time.perf_counter()
    cached = load_dataset("cifar10", root=cifar_root)
    assert cached.extra["from_cache"] is True
    assert torch.equal(cached.test_x, first.test_x)
    assert time.perf_counter() - start < 60
