"""Arithmetic precision of distillation and training: fp32, or bfloat16 autocast.

``bf16`` runs the forward passes under ``torch.autocast(device_type, dtype=torch.bfloat16)``:
convolutions and matmuls in bfloat16, while parameters, the synthetic images and optimizer
state stay fp32 (autocast casts copies, never the tensors themselves) and the backward pass
runs outside the context. ``fp32`` (the default) enters no context at all, so it computes
exactly what the code computed before the option existed.

bfloat16 only pays where the chip computes it natively: CPUs with AVX512-BF16 or AMX, CUDA
devices of compute capability 8.0 or more. Elsewhere autocast would emulate it, slower than
fp32, so a request for it falls back to fp32 with one warning naming the reason.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

__all__ = ["PRECISIONS", "Precision", "autocast_context", "bf16_unsupported_reason"]

PRECISIONS = ("fp32", "bf16")

# Reasons already warned about in this process: a server that trains every round, or a
# loop that calls train_epochs per epoch, says it once rather than once per call.
_WARNED: set[str] = set()


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles, which oneDNN's bfloat16 kernels need to beat fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    # torch.cpu has no public check; these private ones exist since torch 2.3 (absent: no).
    return torch.backends.mkldnn.is_available() and any(
        bool(getattr(torch.cpu, name, lambda: False)()) for name in checks
    )


def bf16_unsupported_reason(device: torch.device | str) -> str | None:
    """Why bfloat16 autocast would not speed up work on ``device``; None when it would."""
    device = torch.device(device)
    if device.type == "cpu":
        if _cpu_has_native_bf16():
            return None
        return "this CPU lacks native bfloat16 (AVX512-BF16 or AMX), so autocast would emulate it"
    if device.type == "cuda":
        with torch.cuda.device(device):
            # Without emulation: pre-Ampere GPUs "support" bf16 only by emulating it, slowly.
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return None
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16 (needs sm_80+)"
    return f"bfloat16 autocast is not supported here on {device.type!r} devices"


@dataclass(frozen=True)
class Precision:
    """A requested precision resolved for one device type: ``dtype`` is the autocast dtype,
    None for plain fp32 (also when bf16 was asked for but is not usable there)."""

    requested: str
    device_type: str
    dtype: torch.dtype | None = None

    @classmethod
    def resolve(
        cls,
        precision: str | Precision,
        device: torch.device | str,
        unusable: str | None = None,
    ) -> Precision:
        """``precision`` (``"fp32"`` or ``"bf16"``) for ``device``.

        A bf16 request falls back to fp32, with one warning naming the reason, where the
        device lacks native bfloat16 or where the caller says why it cannot use it
        (``unusable``, e.g. a privacy bound that holds only in fp32).
        """
        device = torch.device(device)
        if isinstance(precision, Precision):
            if precision.device_type == device.type and unusable is None:
                return precision
            precision = precision.requested
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp32":
            return cls("fp32", device.type)
        reason = unusable or bf16_unsupported_reason(device)
        if reason is not None:
            if reason not in _WARNED:
                _WARNED.add(reason)
                warnings.warn(
                    f"precision 'bf16' falls back to fp32: {reason}", RuntimeWarning, stacklevel=2
                )
            return cls(precision, device.type)
        return cls(precision, device.type, torch.bfloat16)

    @property
    def active(self) -> bool:
        """Whether autocast is on (bf16 asked for and usable)."""
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The autocast context for a forward pass; a no-op context for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def autocast_context(
    device: torch.device | str, precision: str | Precision = "fp32"
) -> contextlib.AbstractContextManager[object]:
    """``Precision.resolve(precision, device).autocast()`` in one call."""
    return Precision.resolve(precision, device).autocast()
