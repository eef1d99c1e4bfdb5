"""Datasets as in-memory tensors: where they live, how to load them, what they look like.

Everything the distillation core needs about a dataset is a :class:`DatasetSpec`
(shape, classes, normalization, augmentation) and a :class:`Dataset` (normalized
float tensors for train and test). Loaders never reach the network unless the
caller passes ``download=True``.

Files live under one *data root* (:func:`data_root`). :func:`import_data` fills
it from an offline copy laid out like the project's ``shared/data`` folder:

* ``MNIST/raw/<name>-ubyte`` -- MNIST's idx files, uncompressed, where
  ``torchvision.datasets.MNIST`` looks for them;
* ``cifar10-jpg/{train,test}/<class>/NNNN.jpg`` -- a JPEG copy of CIFAR-10, read
  with ``torchvision.datasets.ImageFolder`` and cached decoded as
  ``cifar10-jpg/cache/{split}_{x,y}.npy``;
* ``cifar-10-batches-py/`` -- torchvision's own CIFAR-10 batches, preferred to
  the JPEG copy when present (they are lossless).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch

from .augment import DEFAULT_STRATEGY, NO_FLIP_STRATEGY
from .io import atomic_write, temp_sibling

__all__ = [
    "SPECS",
    "ChecksumError",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "data_root",
    "import_data",
    "load_dataset",
]


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset: image shape, classes, normalization, DSA strategy."""

    name: str
    channels: int
    image_size: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dsa_strategy: str = DEFAULT_STRATEGY

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel (shape (C,)), where the pixel values 0 and 1 land after normalization:
        the range every real image lies in."""
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return -mean / std, (1 - mean) / std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the normalized space the models and synthetic sets live in."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


_DIGIT_NAMES = tuple(str(i) for i in range(10))

SPECS: dict[str, DatasetSpec] = {
    # scikit-learn's 8x8 digits, pixel values 0..16 scaled to [0, 1]; stats over the train split
    # of the fixed split in _load_digits (the whole set gives 0.3053 / 0.3760).
    "digits": DatasetSpec("digits", 1, 8, _DIGIT_NAMES, (0.3057,), (0.3762,), NO_FLIP_STRATEGY),
    "mnist": DatasetSpec("mnist", 1, 28, _DIGIT_NAMES, (0.1307,), (0.3081,), NO_FLIP_STRATEGY),
    "cifar10": DatasetSpec(
        "cifar10",
        3,
        32,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465),
        (0.2023, 0.1994, 0.2010),
    ),
}


@dataclass
class Dataset:
    """A dataset held in memory: normalized float32 images (N, C, H, W) and int64 labels."""

    spec: DatasetSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    extra: dict = field(default_factory=dict)


class DatasetNotFoundError(FileNotFoundError):
    """The files a dataset loader needs are not in the data root."""


class ChecksumError(ValueError):
    """A source file does not match the checksum listed for it in ``SHA256SUMS``."""


# Paths relative to the data root / to an import source folder.
MNIST_RAW = Path("MNIST", "raw")
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_JPG = Path("cifar10-jpg")
CIFAR_ARCHIVE = "cifar10-jpg.tar.gz"
CIFAR_BATCHES = Path("cifar-10-batches-py")
_CIFAR_BATCH_FILES = (*tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
# Written last into an extracted copy, holding the archive's SHA-256: its presence means the
# extraction finished, its content tells whether the source archive has changed since.
_COMPLETE_MARKER = ".complete"
_IMPORT_HINT = (
    "Fill the data root with `fedcl-dd data import /path/to/shared/data` "
    "(fedcl_dd.data.import_data), or pass download=True where the internet is reachable."
)


def data_root(root: str | Path | None = None) -> Path:
    """Folder that holds the datasets: ``root`` if given, else ``$FEDCL_DD_DATA``,
    else ``$XDG_CACHE_HOME/fedcl-dd`` (``~/.cache/fedcl-dd`` by default)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FEDCL_DD_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return cache / "fedcl-dd"


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    """Load ``digits``, ``mnist`` or ``cifar10`` as normalized float32 (N, C, H, W) tensors.

    Raises :class:`DatasetNotFoundError` naming the expected files when they are missing
    (and ``download`` is false), ``ValueError`` for an unknown name.
    """
    loaders: dict[str, Callable[[Path, bool], Dataset]] = {
        "digits": _load_digits,
        "mnist": _load_mnist,
        "cifar10": _load_cifar10,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(loaders)}")
    return loaders[name](data_root(root), download)


def holdout(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """``ds`` with ``fraction`` of each class's training images moved into its test split.

    The result's test split is the validation split that settings are chosen on: the real
    test split is dropped, so nothing chosen with it can have seen the test labels. Which
    images are held out depends only on ``seed`` and the training labels.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(ds.train_y), dtype=torch.bool)
    for c in range(ds.spec.num_classes):
        idx = torch.nonzero(ds.train_y == c).flatten()
        n = round(fraction * len(idx))
        if n < 1 or n >= len(idx):
            raise ValueError(
                f"class {c} has {len(idx)} training images; holding out {fraction} of them "
                "leaves none on one side; choose another fraction"
            )
        held[idx[torch.randperm(len(idx), generator=g)[:n]]] = True
    return Dataset(
        ds.spec, ds.train_x[~held], ds.train_y[~held], ds.train_x[held], ds.train_y[held], ds.extra
    )


# --------------------------------------------------------------------------- loaders


def _normalized(spec: DatasetSpec, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) images -> normalized float32, converted in chunks so a 50k-image set
    never holds more than one full-size float copy."""
    out = torch.empty(images.shape, dtype=torch.float32)
    for start in range(0, len(images), 8192):
        chunk = images[start : start + 8192].to(torch.float32).div_(255.0)
        out[start : start + 8192] = spec.normalize(chunk)
    return out


def _load_digits(root: Path, download: bool) -> Dataset:
    """scikit-learn's bundled 8x8 digits with a fixed stratified 75/25 split (needs no files)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the 'digits' dataset comes with scikit-learn: pip install scikit-learn"
        ) from err
    spec = SPECS["digits"]
    bunch = load_digits()
    x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    # Our own split rather than sklearn's train_test_split, so it cannot change with the
    # scikit-learn version: per class, a fixed permutation sends the first quarter to test.
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(y), dtype=bool)
    for c in range(spec.num_classes):
        idx = rng.permutation(np.flatnonzero(bunch.target == c))
        test_mask[idx[: round(0.25 * len(idx))]] = True
    test = torch.from_numpy(test_mask)
    return Dataset(
        spec,
        spec.normalize(x[~test]),
        y[~test],
        spec.normalize(x[test]),
        y[test],
        extra={"source": "sklearn-digits"},
    )


def _load_mnist(root: Path, download: bool) -> Dataset:
    """MNIST from ``root/MNIST/raw/*-ubyte`` through ``torchvision.datasets.MNIST``."""
    raw = root / MNIST_RAW
    missing = [raw / f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing and not download:
        listing = "\n".join(
            f"  {raw / f}" + ("   (missing)" if raw / f in missing else "") for f in MNIST_FILES
        )
        raise DatasetNotFoundError(
            f"MNIST not found under {root}: expected the four uncompressed idx files\n"
            f"{listing}\n{_IMPORT_HINT}"
        )
    # Imported here: torchvision is slow to import and only the file-backed datasets need it.
    from torchvision.datasets import MNIST

    spec = SPECS["mnist"]
    splits = [MNIST(str(root), train=train, download=download) for train in (True, False)]
    tensors = [(_normalized(spec, s.data.unsqueeze(1)), s.targets.to(torch.int64)) for s in splits]
    (train_x, train_y), (test_x, test_y) = tensors
    return Dataset(
        spec, train_x, train_y, test_x, test_y, extra={"source": "mnist-idx", "root": str(root)}
    )


def _load_cifar10(root: Path, download: bool) -> Dataset:
    """CIFAR-10 from torchvision's python batches when present (or downloadable), else from
    the JPEG copy under ``root/cifar10-jpg`` (decoded once, then cached as .npy)."""
    spec = SPECS["cifar10"]
    if download or (root / CIFAR_BATCHES).is_dir():
        from torchvision.datasets import CIFAR10

        arrays = []
        for train in (True, False):
            ds = CIFAR10(str(root), train=train, download=download)
            arrays.append((ds.data, np.asarray(ds.targets, dtype=np.int64), False))
        source = str(CIFAR_BATCHES)
    else:
        jpg = root / CIFAR_JPG
        if not all(_jpeg_split_available(jpg, split) for split in ("train", "test")):
            batches = ", ".join(_CIFAR_BATCH_FILES)
            raise DatasetNotFoundError(
                f"CIFAR-10 not found under {root}: expected either\n"
                f"  the JPEG copy {jpg / 'train'}/<class>/*.jpg and {jpg / 'test'}/<class>/*.jpg"
                f" (classes {', '.join(spec.class_names)}), or\n"
                f"  torchvision's python batches {root / CIFAR_BATCHES}/{{{batches}}}.\n"
                f"{_IMPORT_HINT}"
            )
        arrays = [_load_jpeg_split(jpg, split, spec) for split in ("train", "test")]
        source = str(CIFAR_JPG)

    # Arrays are (N, H, W, C) uint8 in both sources.
    (train_x, train_y, train_cached), (test_x, test_y, test_cached) = arrays
    return Dataset(
        spec,
        _normalized(spec, torch.from_numpy(train_x).permute(0, 3, 1, 2)),
        torch.from_numpy(train_y),
        _normalized(spec, torch.from_numpy(test_x).permute(0, 3, 1, 2)),
        torch.from_numpy(test_y),
        extra={"source": source, "root": str(root), "from_cache": train_cached and test_cached},
    )


def _cache_paths(jpg: Path, split: str) -> tuple[Path, Path]:
    return jpg / "cache" / f"{split}_x.npy", jpg / "cache" / f"{split}_y.npy"


def _jpeg_split_available(jpg: Path, split: str) -> bool:
    return (jpg / split).is_dir() or all(p.is_file() for p in _cache_paths(jpg, split))


def _load_jpeg_split(
    jpg: Path, split: str, spec: DatasetSpec
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(images NHWC uint8, labels int64, read_from_cache) for one split of the JPEG copy."""
    x_path, y_path = _cache_paths(jpg, split)
    shape = (spec.image_size, spec.image_size, spec.channels)
    if x_path.is_file() and y_path.is_file():
        # allow_pickle=False: the cache must never be a way to run code.
        x = np.load(x_path, allow_pickle=False)
        y = np.load(y_path, allow_pickle=False)
        if (x.dtype, x.shape[1:], y.dtype, y.shape) == (np.uint8, shape, np.int64, x.shape[:1]):
            return x, y, True
        warnings.warn(
            f"ignoring malformed CIFAR-10 cache in {x_path.parent}; decoding the JPEGs",
            stacklevel=2,
        )

    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(jpg / split))
    if tuple(folder.classes) != spec.class_names:
        raise ValueError(
            f"{jpg / split} has class folders {folder.classes}; expected {list(spec.class_names)}"
        )
    x = np.empty((len(folder.samples), *shape), dtype=np.uint8)
    for i, (path, _) in enumerate(folder.samples):
        image = np.asarray(folder.loader(path))
        if image.shape != shape:
            raise ValueError(f"{path}: image of shape {image.shape}, expected {shape}")
        x[i] = image
    y = np.asarray(folder.targets, dtype=np.int64)
    try:
        for path, array in ((x_path, x), (y_path, y)):
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, functools.partial(np.save, arr=array, allow_pickle=False))
    except OSError as err:  # a read-only data root still loads, just slowly every time
        warnings.warn(f"could not cache decoded CIFAR-10 in {x_path.parent}: {err}", stacklevel=2)
    return x, y, False


# --------------------------------------------------------------------------- import


def import_data(
    src: str | Path,
    root: str | Path | None = None,
    datasets: Iterable[str] | None = None,
) -> list[Path]:
    """Fill the data root from a folder laid out like ``shared/data`` and return the paths written.

    ``src/MNIST/raw/*-ubyte.gz`` are gunzipped into ``root/MNIST/raw/`` and
    ``src/cifar10-jpg.tar.gz`` is extracted into ``root/cifar10-jpg/``. ``datasets``
    restricts the import to some of ``"mnist"``, ``"cifar10"`` (default: whichever ``src``
    has). Files already imported completely are skipped; everything is written under a
    temporary name and renamed, so an interrupted import leaves no partial file behind.
    Source files listed in ``src/SHA256SUMS`` are verified (:class:`ChecksumError`).
    """
    src = Path(src).expanduser()
    dest = data_root(root)
    looked_for = f"{src / MNIST_RAW}/*-ubyte.gz (MNIST) and {src / CIFAR_ARCHIVE} (CIFAR-10)"
    if not src.is_dir():
        raise FileNotFoundError(f"data source {src} is not a folder; expected {looked_for}")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise ValueError(f"data root {dest} lies inside the source {src}; it is never written to")

    known = ("mnist", "cifar10")
    wanted = tuple(datasets) if datasets is not None else known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"cannot import {unknown}; importable datasets: {', '.join(known)}")
    present = {
        "mnist": any((src / MNIST_RAW / f"{f}.gz").is_file() for f in MNIST_FILES),
        "cifar10": (src / CIFAR_ARCHIVE).is_file(),
    }
    if datasets is None:
        wanted = tuple(name for name in known if present[name])
    if not wanted or not all(present[name] for name in wanted):
        what = " and ".join(n for n in wanted if not present[n]) or "neither dataset"
        raise FileNotFoundError(f"{src} has {what}: looked for {looked_for}")

    sums = _read_sha256sums(src)
    written: list[Path] = []
    if "mnist" in wanted:
        written += _import_mnist(src, dest, sums)
    if "cifar10" in wanted:
        written += _import_cifar(src, dest, sums)
    return written


def _import_mnist(src: Path, dest: Path, sums: dict[str, str]) -> list[Path]:
    gz_files = [src / MNIST_RAW / f"{f}.gz" for f in MNIST_FILES]
    missing = [str(p) for p in gz_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete MNIST in {src}: missing {', '.join(missing)}")
    out_dir = dest / MNIST_RAW
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, gz in zip(MNIST_FILES, gz_files, strict=True):
        target = out_dir / name
        if _idx_complete(target):
            continue
        _verify(src, gz, sums)

        def gunzip(f: BinaryIO, gz: Path = gz) -> None:
            with gzip.open(gz, "rb") as g:
                shutil.copyfileobj(g, f, 1 << 20)

        atomic_write(target, gunzip, check=_idx_complete)
        written.append(target)
    return written


def _import_cifar(src: Path, dest: Path, sums: dict[str, str]) -> list[Path]:
    archive = src / CIFAR_ARCHIVE
    target = dest / CIFAR_JPG
    digest = _verify(src, archive, sums)
    marker = target / _COMPLETE_MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        _extract_tar(archive, tmp)
        if not ((tmp / "train").is_dir() and (tmp / "test").is_dir()):
            raise ValueError(f"{archive} does not hold train/<class>/*.jpg and test/<class>/*.jpg")
        (tmp / _COMPLETE_MARKER).write_text(digest + "\n")
        # Replacing a stale or foreign copy also drops its decoded cache, which may be stale too.
        old = dest / f"{tmp.name}.old"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [target]


def _extract_tar(archive: Path, out: Path) -> None:
    """Extract regular files and folders only, refusing paths that would leave ``out``
    (done by hand because tarfile's ``filter=`` needs Python >= 3.11.4)."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            rel = PurePosixPath(member.name)
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"{archive}: refusing unsafe member path {member.name!r}")
            path = out.joinpath(*rel.parts)
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                path.parent.mkdir(parents=True, exist_ok=True)
                fin = tar.extractfile(member)
                if fin is None:  # tarfile returns no stream only for non-regular members
                    raise ValueError(f"{archive}: cannot read member {member.name!r}")
                with fin, open(path, "wb") as fout:
                    shutil.copyfileobj(fin, fout)


def _idx_complete(path: Path) -> bool:
    """Whether an idx file is as long as its header says (catches truncated copies)."""
    item_size = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[:2] != b"\0\0" or head[2] not in item_size:
                return False
            dims = np.frombuffer(f.read(4 * head[3]), dtype=">u4")
        if len(dims) != head[3]:
            return False
        payload = math.prod(int(d) for d in dims) * item_size[head[2]]
        return path.stat().st_size == 4 + 4 * head[3] + payload
    except OSError:
        return False


def _read_sha256sums(src: Path) -> dict[str, str]:
    """``SHA256SUMS`` as {relative path: hex digest}; empty when the file is absent."""
    sums_file = src / "SHA256SUMS"
    if not sums_file.is_file():
        return {}
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest.lower()  # '*' marks binary mode in sha256sum output
    return sums


def _verify(src: Path, path: Path, sums: dict[str, str]) -> str:
    """SHA-256 of ``path``; raises :class:`ChecksumError` if ``SHA256SUMS`` lists another."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    expected = sums.get(path.relative_to(src).as_posix())
    if expected is not None and expected != digest:
        raise ChecksumError(
            f"{path} has SHA-256 {digest}, but {src / 'SHA256SUMS'} lists {expected}: "
            "the copy is corrupt or incomplete; copy it again"
        )
    return digest
