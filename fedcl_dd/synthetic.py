"""Synthetic sets: learnable modules that materialize ``(images, targets)``.

Two parameterizations share one interface:

* :class:`PixelSet` stores every image's pixels (the DC/DSA/DM/MTT setting).
* :class:`AddressingSet` stores K shared bases and, per image slot j, an
  addressing matrix A_j of shape classes x K (Deng & Russakovsky, "Remember the
  Past: Distilling Datasets into Addressable Memories for Neural Networks",
  NeurIPS 2022). Image j of class c is ``onehot(c)^T A_j B``: at the byte cost
  of N pixel images it yields many more images.

``nbytes`` is the honest size of what a file or an upload holds: every stored
tensor at the storage dtype (fp32 or fp16), labels included. Hard labels cost
2 bytes an image (int16), so :func:`bytes_per_image` is the cost of one
labelled image and budgets "of N images" count those labels too, as a replay
buffer of N real images would.

Sets save to and load from safetensors with JSON metadata; loading validates
every tensor (keys, dtypes, shapes, finiteness, label range) and never unpickles.
The same validation serves uploads that arrive as plain arrays (:meth:`SyntheticSet.from_state`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .io import atomic_write
from .sampling import ClassSampler

__all__ = [
    "FORMAT",
    "AddressingPlan",
    "AddressingSet",
    "InvalidSyntheticSet",
    "PixelSet",
    "SyntheticSet",
    "bytes_per_image",
    "pixel_ipc_for_budget",
    "soft_label_bytes",
]

FORMAT = "fedcl-dd/synthetic-set"
FORMAT_VERSION = "1"
LABEL_DTYPE = torch.int16
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_SOFT_LABEL_INIT = 0.95  # probability on the true class when soft labels start out


class InvalidSyntheticSet(ValueError):
    """A file or upload that is not a well-formed synthetic set; the message says why."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _FLOAT_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"storage dtype must be float32 or float16, got {dtype}")


def image_shape3(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a (channels, height, width) triple of positive ints; anything else is a ValueError."""
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"an image shape is (channels, height, width) >= 1, got {tuple(shape)}")
    return dims[0], dims[1], dims[2]


def bytes_per_image(image_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one stored image with its hard label (int16)."""
    return math.prod(image_shape) * _itemsize(dtype) + _itemsize(LABEL_DTYPE)


def soft_label_bytes(num_classes: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one image's soft labels (``label_logits``: ``num_classes`` values at ``dtype``)."""
    return num_classes * _itemsize(dtype)


def pixel_ipc_for_budget(
    budget_bytes: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    dtype: torch.dtype = torch.float32,
) -> int:
    """Images per class a :class:`PixelSet` of ``num_classes`` classes can hold within ``budget_bytes``."""
    per_class = bytes_per_image(image_shape, dtype) * num_classes
    ipc = int(budget_bytes) // per_class
    if ipc < 1:
        raise ValueError(
            f"a budget of {budget_bytes} bytes is too small for one image per class: "
            f"{num_classes} classes of {tuple(image_shape)} images at {_dtype_name(dtype)} need "
            f"at least {per_class} bytes; raise --budget-bytes or use fp16 storage"
        )
    return ipc


class SyntheticSet(nn.Module):
    """Base class: a learnable set of labelled images.

    Subclasses implement :meth:`images`, :attr:`class_ids` and the payload they store.
    ``label_mode='soft'`` adds learnable label logits (trained by objectives whose loss
    involves labels: gradient and trajectory matching).
    """

    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[SyntheticSet]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            SyntheticSet._registry[cls.kind] = cls

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        storage_dtype: torch.dtype = torch.float32,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.image_shape = image_shape3(image_shape)
        _dtype_name(storage_dtype)
        self.storage_dtype = storage_dtype
        # Free-form, JSON-able facts carried into the file: method, dataset, mean, std, class names.
        self.info: dict[str, Any] = dict(info or {})
        self.label_logits: nn.Parameter | None = None

    def project_(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Clamp the stored images into ``[low, high]`` (per channel, shape (C,)), in place, where
        the parameterization stores pixels; others (this base class, the addressing memory,
        whose images are products of bases and addresses) are left as they are."""

    # -- what subclasses provide --------------------------------------------------------------
    def images(self) -> torch.Tensor:
        """All images, (N, C, H, W), in the normalized space of the real data."""
        raise NotImplementedError

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` (a 1-D int64 tensor), as ``images()[index]``; kinds that
        can build a few images without all the others (the addressing memory) override it."""
        return self.images()[index]

    @property
    def class_ids(self) -> torch.Tensor:
        """The class each image stands for, (N,) int64 (also the hard label)."""
        raise NotImplementedError

    def _payload(self) -> dict[str, torch.Tensor]:
        """Tensors that define the set, apart from soft labels."""
        raise NotImplementedError

    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    # -- shared behaviour ---------------------------------------------------------------------
    @property
    def label_mode(self) -> str:
        return "soft" if self.label_logits is not None else "hard"

    def make_labels_learnable(self) -> None:
        """Switch to soft labels, starting near the hard ones (0.95 on the image's class)."""
        if self.label_logits is not None:
            return
        n, k = self.num_images, self.num_classes
        probs = torch.full((n, k), (1 - _SOFT_LABEL_INIT) / max(k - 1, 1))
        probs[torch.arange(n), self.class_ids.cpu()] = _SOFT_LABEL_INIT
        device = self.class_ids.device
        self.label_logits = nn.Parameter(probs.log().to(device))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer groups of the set's parameters (soft labels apart) for an image
        learning rate ``lr``: one group at ``lr`` by default; a factored set scales each factor's
        rate so that a step moves its images as a pixel step at ``lr`` would."""
        return [
            {"params": [p for n, p in self.named_parameters() if n != "label_logits"], "lr": lr}
        ]

    def targets(self) -> torch.Tensor:
        """Training targets: int64 class ids (hard) or probabilities (N, classes) (soft)."""
        if self.label_logits is None:
            return self.class_ids
        return torch.softmax(self.label_logits, dim=1)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images(), self.targets()

    @property
    def num_images(self) -> int:
        return int(self.class_ids.numel())

    def counts(self) -> torch.Tensor:
        """Images per class over the whole label space, (num_classes,) int64."""
        return torch.bincount(self.class_ids.cpu(), minlength=self.num_classes)

    @property
    def classes(self) -> list[int]:
        """Classes the set holds images of."""
        return [c for c, n in enumerate(self.counts().tolist()) if n > 0]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything stored or sent: contiguous CPU tensors at the storage dtype."""
        out = {}
        for key, t in self._payload().items():
            t = t.detach().cpu()
            out[key] = (t.to(self.storage_dtype) if t.is_floating_point() else t).contiguous()
        if self.label_logits is not None:
            out["label_logits"] = (
                self.label_logits.detach().cpu().to(self.storage_dtype).contiguous()
            )
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of :meth:`state_tensors` (what a file or an upload carries, header aside)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def metadata(self) -> dict[str, str]:
        """String metadata for safetensors: format, kind, shape and the free-form ``info``."""
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "num_classes": str(self.num_classes),
            "image_shape": json.dumps(list(self.image_shape)),
            "storage_dtype": _dtype_name(self.storage_dtype),
            "label_mode": self.label_mode,
            "info": json.dumps(self.info),
        }
        meta.update({k: json.dumps(v) for k, v in self._extra_metadata().items()})
        return meta

    def save(self, path: str | Path) -> Path:
        """Write the set as safetensors, atomically (a crash never leaves a half-written file)."""
        data = safetensors_bytes(self.state_tensors(), metadata=self.metadata())
        return atomic_write(path, lambda f: f.write(data))

    @staticmethod
    def from_state(
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        max_bytes: int | None = None,
        max_images: int | None = None,
    ) -> SyntheticSet:
        """Rebuild and validate a set from stored tensors and metadata.

        Raises :class:`InvalidSyntheticSet` naming the first problem found: unknown format,
        a newer format version or an unknown kind, missing or extra tensors, wrong dtype or shape, NaN/Inf, labels outside
        the label space, or more bytes/images than ``max_bytes``/``max_images``.
        """
        if metadata.get("format") != FORMAT:
            raise InvalidSyntheticSet(
                f"not a synthetic set: metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r}"
            )
        version = metadata.get("version", FORMAT_VERSION)
        if not (isinstance(version, str) and version.isdigit()):
            raise InvalidSyntheticSet(f"malformed format version {version!r}")
        if int(version) > int(FORMAT_VERSION):
            raise InvalidSyntheticSet(
                f"written in format version {version}, newer than this fedcl-dd reads "
                f"({FORMAT_VERSION}); upgrade fedcl-dd to load it"
            )
        kind = metadata.get("kind")
        cls = SyntheticSet._registry.get(kind or "")
        if cls is None:
            raise InvalidSyntheticSet(
                f"unknown kind {kind!r}; known: {sorted(SyntheticSet._registry)}"
            )
        try:
            num_classes = int(metadata["num_classes"])
            image_shape = image_shape3(json.loads(metadata["image_shape"]))
            storage = _FLOAT_DTYPES[metadata["storage_dtype"]]
            label_mode = metadata["label_mode"]
            info = json.loads(metadata.get("info", "{}"))
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidSyntheticSet(
                f"malformed metadata ({exc!r}); was the file written by fedcl-dd?"
            ) from exc
        if num_classes < 1:
            raise InvalidSyntheticSet(
                f"bad shape metadata: num_classes={num_classes}, image_shape={image_shape}"
            )
        if label_mode not in ("hard", "soft"):
            raise InvalidSyntheticSet(f"label_mode must be 'hard' or 'soft', got {label_mode!r}")
        for key, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise InvalidSyntheticSet(f"tensor {key!r} is a {type(t).__name__}, not a tensor")
            if t.is_floating_point():
                if t.dtype not in _FLOAT_DTYPES.values():
                    raise InvalidSyntheticSet(
                        f"tensor {key!r} has dtype {t.dtype}; expected float32 or float16"
                    )
                if not torch.isfinite(t).all():
                    raise InvalidSyntheticSet(f"tensor {key!r} holds NaN or Inf values")
        expected = set(cls._payload_keys()) | ({"label_logits"} if label_mode == "soft" else set())
        if set(tensors) != expected:
            missing, extra = expected - set(tensors), set(tensors) - expected
            raise InvalidSyntheticSet(
                f"{kind} set needs tensors {sorted(expected)}; missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        extra_meta = {
            k: json.loads(metadata[k]) for k in cls._extra_metadata_keys() if k in metadata
        }
        syn = cls._from_payload(tensors, num_classes, image_shape, storage, info, extra_meta)
        if label_mode == "soft":
            logits = tensors["label_logits"]
            if tuple(logits.shape) != (syn.num_images, num_classes):
                raise InvalidSyntheticSet(
                    f"label_logits has shape {tuple(logits.shape)}, expected {(syn.num_images, num_classes)}"
                )
            syn.label_logits = nn.Parameter(logits.float().clone())
        if max_images is not None and syn.num_images > max_images:
            raise InvalidSyntheticSet(f"{syn.num_images} images exceed the limit of {max_images}")
        if max_bytes is not None and syn.nbytes > max_bytes:
            raise InvalidSyntheticSet(f"{syn.nbytes} bytes exceed the budget of {max_bytes}")
        return syn

    @classmethod
    def _payload_keys(cls) -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def _extra_metadata_keys(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def _from_payload(
        cls,
        tensors: dict[str, torch.Tensor],
        num_classes: int,
        image_shape: tuple[int, int, int],
        storage: torch.dtype,
        info: dict[str, Any],
        extra_meta: dict[str, str],
    ) -> SyntheticSet:
        raise NotImplementedError

    @staticmethod
    def load(path: str | Path, **limits: int) -> SyntheticSet:
        """Load a set saved by :meth:`save` (safetensors only; nothing is unpickled)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no synthetic set at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidSyntheticSet(f"{path} is not a readable safetensors file: {exc}") from exc
        try:
            return SyntheticSet.from_state(tensors, metadata, **limits)
        except InvalidSyntheticSet as exc:
            raise InvalidSyntheticSet(f"{path}: {exc}") from exc


def _check_labels(labels: torch.Tensor, num_classes: int, key: str) -> torch.Tensor:
    if labels.is_floating_point() or labels.dim() != 1:
        raise InvalidSyntheticSet(
            f"{key!r} must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InvalidSyntheticSet(
            f"{key!r} holds classes {int(labels.min())}..{int(labels.max())}, outside [0, {num_classes})"
        )
    return labels.long()


class PixelSet(SyntheticSet):
    """A synthetic set stored pixel by pixel, with one hard class per image."""

    kind = "pixels"
    labels: torch.Tensor  # buffer: one hard label per image

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        storage_dtype: torch.dtype = torch.float32,
        info: dict[str, Any] | None = None,
    ) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match"
            )
        super().__init__(num_classes, image_shape3(images.shape[1:]), storage_dtype, info)
        labels = _check_labels(labels, num_classes, "labels")
        self.pixels = nn.Parameter(images.detach().clone().float())
        self.register_buffer("labels", labels.clone().to(images.device))

    def images(self) -> torch.Tensor:
        return self.pixels

    def project_(self, low: torch.Tensor, high: torch.Tensor) -> None:
        # Multi-formation sets upsample bilinearly: convex combinations of clamped pixels stay
        # within the bounds, so clamping what is stored bounds every materialized image.
        shape = (1, -1, 1, 1)
        with torch.no_grad():
            self.pixels.clamp_(low.to(self.pixels).view(shape), high.to(self.pixels).view(shape))

    @property
    def class_ids(self) -> torch.Tensor:
        return self.labels

    def _payload(self) -> dict[str, torch.Tensor]:
        return {"images": self.pixels, "labels": self.labels.to(LABEL_DTYPE)}

    @classmethod
    def _payload_keys(cls) -> tuple[str, ...]:
        return ("images", "labels")

    @classmethod
    def _from_payload(
        cls,
        tensors: dict[str, torch.Tensor],
        num_classes: int,
        image_shape: tuple[int, int, int],
        storage: torch.dtype,
        info: dict[str, Any],
        extra_meta: dict[str, str],
    ) -> PixelSet:
        images = tensors["images"]
        if (
            not images.is_floating_point()
            or tuple(images.shape[1:]) != image_shape
            or images.dim() != 4
        ):
            raise InvalidSyntheticSet(
                f"'images' must be float (N, {', '.join(map(str, image_shape))}), got {images.dtype} {tuple(images.shape)}"
            )
        labels = _check_labels(tensors["labels"], num_classes, "labels")
        if labels.numel() != images.shape[0]:
            raise InvalidSyntheticSet(f"{images.shape[0]} images but {labels.numel()} labels")
        return cls(images.float(), labels, num_classes, storage, info)

    @classmethod
    def from_real(
        cls,
        sampler: ClassSampler,
        ipc: int | dict[int, int],
        classes: list[int] | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> PixelSet:
        """Initialize from randomly chosen real images (``ipc`` per class, or a per-class dict)."""
        per_class = _per_class(ipc, classes if classes is not None else sampler.classes)
        images = [sampler.sample(c, n, generator) for c, n in per_class.items()]
        labels = [torch.full((n,), c, dtype=torch.long) for c, n in per_class.items()]
        return cls(
            torch.cat(images), torch.cat(labels).to(sampler.device), sampler.num_classes, **kwargs
        )

    @classmethod
    def from_noise(
        cls,
        num_classes: int,
        image_shape: tuple[int, int, int],
        ipc: int | dict[int, int],
        classes: list[int] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> PixelSet:
        """Initialize from standard Gaussian noise (the DC paper's start)."""
        per_class = _per_class(ipc, classes if classes is not None else list(range(num_classes)))
        total = sum(per_class.values())
        images = torch.randn(total, *image_shape, generator=generator)
        labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in per_class.items()])
        return cls(images.to(device), labels.to(device), num_classes, **kwargs)


class MultiFormationSet(PixelSet):
    """Multi-formation pixels (Kim et al., "Dataset Condensation via Efficient Synthetic-Data
    Parameterization", ICML 2022): each stored image of one class is a ``factor`` x
    ``factor`` mosaic of sub-images at 1/factor resolution, each upsampled (bilinear) to the
    full size when materialized -- the bytes of N stored images replay N * factor^2 images.
    Images come out stored-image-major (all sub-images of stored image 0, then 1, ...).
    """

    kind = "multi"

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        factor: int = 2,
        storage_dtype: torch.dtype = torch.float32,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(images, labels, num_classes, storage_dtype, info)
        _, h, w = self.image_shape
        if factor < 1 or h % factor or w % factor:
            raise ValueError(f"factor {factor} must divide the image size {h}x{w}")
        self.factor = int(factor)

    def images(self) -> torch.Tensor:
        f = self.factor
        if f == 1:
            return self.pixels
        n, c, h, w = self.pixels.shape
        tiles = (
            self.pixels.view(n, c, f, h // f, f, w // f)
            .permute(0, 2, 4, 1, 3, 5)  # (n, row, col, c, h/f, w/f)
            .reshape(n * f * f, c, h // f, w // f)
        )
        return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if f == 1:
            return self.pixels[index]
        stored = self.pixels[index // (f * f)]  # the mosaic each asked-for image comes from
        k, c, h, w = stored.shape
        tile = index % (f * f)
        tiles = stored.view(k, c, f, h // f, f, w // f)[torch.arange(k), :, tile // f, :, tile % f]
        return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)

    @property
    def class_ids(self) -> torch.Tensor:
        return self.labels.repeat_interleave(self.factor**2)

    def _extra_metadata(self) -> dict[str, Any]:
        return {"factor": self.factor}

    @classmethod
    def _extra_metadata_keys(cls) -> tuple[str, ...]:
        return ("factor",)

    @classmethod
    def _from_payload(
        cls,
        tensors: dict[str, torch.Tensor],
        num_classes: int,
        image_shape: tuple[int, int, int],
        storage: torch.dtype,
        info: dict[str, Any],
        extra_meta: dict[str, str],
    ) -> MultiFormationSet:
        plain = PixelSet._from_payload(tensors, num_classes, image_shape, storage, info, extra_meta)
        try:
            factor = int(extra_meta["factor"])
            return cls(plain.pixels.detach(), plain.labels, num_classes, factor, storage, info)
        except (KeyError, ValueError) as exc:
            raise InvalidSyntheticSet(f"bad multi-formation metadata: {exc}") from exc

    @classmethod
    def tiled_from_real(
        cls,
        sampler: ClassSampler,
        stored_per_class: int,
        factor: int,
        classes: list[int],
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> MultiFormationSet:
        """Stored images tiled from ``factor``^2 real images of their class each, downsampled
        to 1/factor (IDC's initialization)."""
        f = factor
        n_sub = stored_per_class * f * f
        stored, labels = [], []
        for c in classes:
            x = sampler.sample(c, n_sub, generator)
            small = F.avg_pool2d(x, f) if f > 1 else x  # (n_sub, C, H/f, W/f)
            _, ch, hs, ws = small.shape
            mosaic = (
                small.view(stored_per_class, f, f, ch, hs, ws)
                .permute(0, 3, 1, 4, 2, 5)
                .reshape(stored_per_class, ch, hs * f, ws * f)
            )
            stored.append(mosaic)
            labels.append(torch.full((stored_per_class,), c, dtype=torch.long))
        return cls(
            torch.cat(stored),
            torch.cat(labels).to(sampler.device),
            sampler.num_classes,
            factor,
            **kwargs,
        )


def _per_class(ipc: int | dict[int, int], classes: list[int]) -> dict[int, int]:
    per_class = dict(ipc) if isinstance(ipc, dict) else {c: int(ipc) for c in classes}
    bad = {c: n for c, n in per_class.items() if n < 1}
    if bad or not per_class:
        raise ValueError(f"images per class must be >= 1 for every class, got {bad or per_class}")
    return per_class


@dataclass(frozen=True)
class AddressingPlan:
    """How an addressing memory spends a byte budget: K bases at 1/downsample resolution, r images per class."""

    bases: int
    per_class: int
    downsample: int
    num_classes: int
    image_shape: tuple[int, int, int]
    storage_dtype: torch.dtype = torch.float32

    @property
    def base_shape(self) -> tuple[int, int, int]:
        c, h, w = self.image_shape
        return (c, h // self.downsample, w // self.downsample)

    @property
    def nbytes(self) -> int:
        floats = (
            self.bases * math.prod(self.base_shape) + self.per_class * self.num_classes * self.bases
        )
        return floats * _itemsize(self.storage_dtype) + self.num_classes * _itemsize(LABEL_DTYPE)

    @staticmethod
    def for_budget(
        budget_bytes: int,
        num_classes: int,
        image_shape: tuple[int, int, int],
        storage_dtype: torch.dtype = torch.float32,
        downsample: int = 2,
        bases: int | None = None,
        bases_fraction: float = 0.4,
    ) -> AddressingPlan:
        """Size a memory for ``budget_bytes``: r = (floats - K*base) / (classes*K), as in the paper.

        With ``bases=None``, K spends about ``bases_fraction`` of the budget on bases (the
        paper's CIFAR-10 setting, K=16 at one image per class and ds=2, spends 40%), capped
        at a quarter of the base dimension so that an image's address costs at most a
        quarter of its pixels: the memory's gain is in sharing low-rank bases.
        """
        c, h, w = image_shape
        if downsample < 1 or h % downsample or w % downsample:
            raise ValueError(
                f"downsample {downsample} must be >= 1 and divide the image size {h}x{w}"
            )
        item = _itemsize(storage_dtype)
        base_numel = c * (h // downsample) * (w // downsample)
        floats = (int(budget_bytes) - num_classes * _itemsize(LABEL_DTYPE)) // item
        if bases is None:
            bases = max(1, min(base_numel // 4, int(bases_fraction * floats) // base_numel))
        per_class = (floats - bases * base_numel) // (num_classes * bases) if floats > 0 else 0
        if per_class < 1:
            need = (bases * base_numel + num_classes * bases) * item + num_classes * _itemsize(
                LABEL_DTYPE
            )
            raise ValueError(
                f"a budget of {budget_bytes} bytes is too small for an addressing memory with one image "
                f"per class: {bases} bases of {base_numel} floats for {num_classes} classes need {need} "
                f"bytes; raise the budget, lower the number of bases or raise the downsample factor"
            )
        return AddressingPlan(
            bases, int(per_class), downsample, num_classes, image_shape3(image_shape), storage_dtype
        )


class AddressingSet(SyntheticSet):
    """Addressing-matrix memory (Deng & Russakovsky, NeurIPS 2022).

    Parameters: ``bases`` B of shape (K, C*h*w) with h = H/downsample, and ``addresses``
    of shape (r, n, K) for the n classes held: A_j = ``addresses[j]``, and image j of
    the i-th held class is ``addresses[j, i] @ B``, reshaped and bilinearly upsampled.
    Images come out class-major: all r images of the first held class, then the next.
    """

    kind = "addressing"
    held: torch.Tensor  # buffer: the class ids held, in the order of ``addresses``' rows

    def __init__(
        self,
        bases: torch.Tensor,
        addresses: torch.Tensor,
        classes: torch.Tensor,
        num_classes: int,
        image_shape: tuple[int, int, int],
        downsample: int = 1,
        storage_dtype: torch.dtype = torch.float32,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, image_shape, storage_dtype, info)
        c, h, w = self.image_shape
        if downsample < 1 or h % downsample or w % downsample:
            raise ValueError(f"downsample {downsample} must divide the image size {h}x{w}")
        base_numel = c * (h // downsample) * (w // downsample)
        if bases.dim() != 2 or bases.shape[1] != base_numel:
            raise ValueError(f"bases must be (K, {base_numel}), got {tuple(bases.shape)}")
        if addresses.dim() != 3 or addresses.shape[1:] != (classes.numel(), bases.shape[0]):
            raise ValueError(
                f"addresses must be (r, {classes.numel()}, {bases.shape[0]}), got {tuple(addresses.shape)}"
            )
        classes = _check_labels(classes, num_classes, "classes")
        if classes.unique().numel() != classes.numel():
            raise ValueError(f"classes must be distinct, got {classes.tolist()}")
        self.downsample = int(downsample)
        self.bases = nn.Parameter(bases.detach().clone().float())
        self.addresses = nn.Parameter(addresses.detach().clone().float())
        self.register_buffer("held", classes.clone().to(bases.device))

    @property
    def per_class(self) -> int:
        return int(self.addresses.shape[0])

    @property
    def class_ids(self) -> torch.Tensor:
        return self.held.repeat_interleave(self.per_class)

    def images(self) -> torch.Tensor:
        c, h, w = self.image_shape
        r, n, k = self.addresses.shape
        coef = self.addresses.transpose(0, 1).reshape(n * r, k)  # class-major rows
        small = (coef @ self.bases).view(n * r, c, h // self.downsample, w // self.downsample)
        if self.downsample == 1:
            return small
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Addresses and bases at rates scaled to their images: images are ``coef @ bases``, so
        an SGD step on the bases moves them by ``coef coef^T`` times the gradient and one on the
        addresses by ``bases bases^T`` times it; each rate is ``lr`` over the largest eigenvalue
        of its factor's Gram matrix (taken when the optimizer is built), so neither step moves
        an image further than a pixel step at ``lr`` (the PCA bases' Gram is the identity, while
        the addresses' grows with the images and their norms: unscaled, it blows the set up)."""
        with torch.no_grad():
            k = self.addresses.shape[-1]
            coef = self.addresses.detach().reshape(-1, k).double()
            bases = self.bases.detach().double()
            scale_b = float(torch.linalg.eigvalsh(coef.T @ coef)[-1].clamp_min(1e-12))
            scale_a = float(torch.linalg.eigvalsh(bases @ bases.T)[-1].clamp_min(1e-12))
        return [
            {"params": [self.addresses], "lr": lr / scale_a},
            {"params": [self.bases], "lr": lr / scale_b},
        ]

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        r = self.addresses.shape[0]
        # Image j is row j % r of class slot j // r (the order of images()); indexing the
        # addresses directly, rather than a reshaped copy of them all, keeps one image's
        # cost independent of the memory's size (replay builds images one at a time).
        coef = self.addresses[index % r, index // r]
        small = (coef @ self.bases).view(-1, c, h // self.downsample, w // self.downsample)
        if self.downsample == 1:
            return small
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)

    def _payload(self) -> dict[str, torch.Tensor]:
        return {
            "bases": self.bases,
            "addresses": self.addresses,
            "classes": self.held.to(LABEL_DTYPE),
        }

    def _extra_metadata(self) -> dict[str, Any]:
        return {"downsample": self.downsample}

    @classmethod
    def _payload_keys(cls) -> tuple[str, ...]:
        return ("bases", "addresses", "classes")

    @classmethod
    def _extra_metadata_keys(cls) -> tuple[str, ...]:
        return ("downsample",)

    @classmethod
    def _from_payload(
        cls,
        tensors: dict[str, torch.Tensor],
        num_classes: int,
        image_shape: tuple[int, int, int],
        storage: torch.dtype,
        info: dict[str, Any],
        extra_meta: dict[str, str],
    ) -> AddressingSet:
        classes = _check_labels(tensors["classes"], num_classes, "classes")
        bases, addresses = tensors["bases"], tensors["addresses"]
        if not (bases.is_floating_point() and addresses.is_floating_point()):
            raise InvalidSyntheticSet("'bases' and 'addresses' must be floating point")
        try:
            return cls(
                bases.float(),
                addresses.float(),
                classes,
                num_classes,
                image_shape,
                int(extra_meta.get("downsample", 1)),
                storage,
                info,
            )
        except ValueError as exc:
            raise InvalidSyntheticSet(str(exc)) from exc

    @classmethod
    def from_real(
        cls,
        sampler: ClassSampler,
        plan: AddressingPlan,
        classes: list[int] | None = None,
        generator: torch.Generator | None = None,
        fit_samples: int = 2000,
        **kwargs: Any,
    ) -> AddressingSet:
        """Start from real data: bases = top-K principal directions of downsampled real images,
        and each address row = the coefficients of one random real image of its class.

        Every initial image is then the projection of a real image onto the bases, the
        addressing analogue of initializing pixel sets from real samples.
        """
        classes = list(classes if classes is not None else sampler.classes)
        ds = plan.downsample
        per_fit = max(1, fit_samples // len(classes))
        fit_x, _ = sampler.sample_classes(classes, per_fit, generator)
        flat = _downsample(fit_x, ds).flatten(1)
        bases = _principal_directions(flat, plan.bases, generator)
        project = torch.linalg.pinv(bases)  # (D, K): least-squares coefficients on the bases
        rows = []
        for c in classes:
            x = _downsample(sampler.sample(c, plan.per_class, generator), ds).flatten(1)
            rows.append(x @ project)  # (r, K)
        addresses = torch.stack(rows, dim=1)  # (r, n, K)
        held = torch.tensor(classes, dtype=torch.long, device=flat.device)
        return cls(
            bases,
            addresses,
            held,
            sampler.num_classes,
            plan.image_shape,
            ds,
            plan.storage_dtype,
            **kwargs,
        )

    @classmethod
    def from_noise(
        cls,
        plan: AddressingPlan,
        num_classes: int,
        classes: list[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> AddressingSet:
        """Start from noise (``num_classes`` is the size of the label space): random unit bases and Gaussian addresses scaled so that images have
        about unit variance per pixel, like normalized data. Touches no real data (private use)."""
        base_numel = math.prod(plan.base_shape)
        bases = torch.randn(plan.bases, base_numel, generator=generator)
        bases = bases / bases.norm(dim=1, keepdim=True)
        scale = math.sqrt(base_numel / plan.bases)
        addresses = (
            torch.randn(plan.per_class, len(classes), plan.bases, generator=generator) * scale
        )
        held = torch.tensor(classes, dtype=torch.long)
        return cls(
            bases.to(device),
            addresses.to(device),
            held.to(device),
            num_classes,
            plan.image_shape,
            plan.downsample,
            plan.storage_dtype,
            **kwargs,
        )


def _downsample(x: torch.Tensor, ds: int) -> torch.Tensor:
    return F.avg_pool2d(x, ds) if ds > 1 else x


def _principal_directions(
    flat: torch.Tensor, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """The top-``k`` right singular vectors of ``flat`` (uncentred, so the mean image is covered),
    completed with random unit directions when the data has fewer than ``k``."""
    _, _, vh = torch.linalg.svd(flat.float(), full_matrices=False)
    vh = vh[:k]
    if vh.shape[0] < k:
        extra = torch.randn(k - vh.shape[0], flat.shape[1], generator=generator).to(flat.device)
        vh = torch.cat([vh, extra / extra.norm(dim=1, keepdim=True)])
    return vh.contiguous()
