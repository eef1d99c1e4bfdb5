"""Networks used for distillation and for evaluating synthetic sets.

The ConvNet is the one of the DC/DSA/DM papers (Zhao et al. ICLR 2021; Zhao &
Bilen WACV 2023): ``depth`` blocks of Conv3x3(width) -> instance norm ->
ReLU -> AvgPool2x2, then a linear classifier. Instance norm is a GroupNorm
with one group per channel, as in those papers. 28-pixel inputs get padding 3
in the first convolution so that MNIST ends at the same 4x4 map as CIFAR-10.

Every model exposes ``embed(x)`` (penultimate features, what distribution
matching compares) and is initialized from an explicit ``torch.Generator`` so
that a fresh network is reproducible without touching the global RNG.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP",
    "MODELS",
    "AvgPool2x2",
    "ConvNet",
    "ResNet18",
    "conv2d",
    "embed",
    "init_parameters",
    "make_model",
]


def embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net.embed(x)``: the penultimate features that distribution matching compares."""
    method = getattr(net, "embed", None)
    if not callable(method):
        raise TypeError(
            f"{type(net).__name__} has no embed(x) method; distribution matching compares "
            "penultimate features: give the model an embed(x) returning them, as fedcl_dd.models' do"
        )
    out: torch.Tensor = method(x)
    return out


def init_parameters(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialize ``model`` the way PyTorch does by default, drawing from ``generator``.

    PyTorch's own ``reset_parameters`` draws from the global RNG; distillation samples
    thousands of fresh networks, and we want each draw reproducible from the loop's own
    generator instead.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


class ConvNet(nn.Module):
    """ConvNet-D{depth}W{width} with instance norm, ReLU and average pooling."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = image_size
        in_ch = channels
        for d in range(depth):
            # MNIST: 28 + 2*3 - 2 = 32, so the feature map matches CIFAR-10's.
            padding = 3 if (d == 0 and image_size == 28) else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=padding))
            size = size + 2 * padding - 2
            layers.append(_norm(norm, width))
            layers.append(nn.ReLU(inplace=True))
            if size >= 2:
                layers.append(AvgPool2x2())
                size //= 2
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.features:
            x = conv2d(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class _ConvBiasApart(torch.autograd.Function):
    """``F.conv2d`` (stride 1, zero padding) whose backward sums the bias gradient itself.

    oneDNN's convolution backward sums the bias gradient slowly on CPU: for the ConvNet's first
    layer on 100 MNIST images (a (100, 128, 32, 32) output gradient) it took 35 of its 44 ms in
    bfloat16 and 11 of 19 ms in fp32, against about 5 ms (bf16, a matrix-vector product) and
    2 ms (fp32, per-image sums) here. One thread, measured on an AMD EPYC with AVX512-BF16.
    The input and weight gradients are oneDNN's, asked for without the bias.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: tuple[int, int]
    ) -> torch.Tensor:
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, _, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.padding = padding

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                [1, 1],
                list(ctx.padding),
                [1, 1],
                False,
                [0, 0],
                1,
                [need_x, need_w, False],
            )
        if need_b:
            per_image = grad.reshape(grad.shape[0], grad.shape[1], -1)
            if grad.dtype == torch.bfloat16:
                # bf16 sums over large tensors are slow on CPU; a product with ones is not
                # (oneDNN accumulates it in fp32).
                ones = torch.ones(per_image.shape[-1], dtype=grad.dtype)
                grad_b = (per_image @ ones).sum(0, dtype=torch.float32).to(grad.dtype)
            else:
                grad_b = per_image.sum(-1).sum(0)
        return grad_x, grad_w, grad_b, None


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has hooks (Opacus's per-sample gradients use them), which only a call
    of the module itself fires."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_backward_hooks
        or nn.modules.module._global_backward_pre_hooks
    )


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, through :class:`_ConvBiasApart` where its bias is trained on CPU (the same
    result and gradients, faster); the module itself elsewhere: other devices, convolutions
    with stride, dilation, groups or other padding, hooked modules, compiled graphs."""
    bias = conv.bias
    if (
        bias is None
        or not (torch.is_grad_enabled() and bias.requires_grad)
        or x.device.type != "cpu"
        or x.dim() != 4
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or _hooked(conv)
        or torch.compiler.is_compiling()
    ):
        out: torch.Tensor = conv(x)
        return out
    weight = conv.weight
    autocast = torch.is_autocast_enabled("cpu")
    if autocast:
        # What autocast does for a convolution: bfloat16 copies, differentiable back to fp32.
        dtype = torch.get_autocast_dtype("cpu")
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with torch.autocast("cpu", enabled=False) if autocast else contextlib.nullcontext():
        out = _ConvBiasApart.apply(x, weight, bias, conv.padding)
    return out


class _SumPool2x2(torch.autograd.Function):
    """2x2 average pooling of an even-sized contiguous NCHW tensor, as sums of stride-2 slices,
    with the backward written as two broadcast copies."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.view(n, c, h // 2, 2 * w)  # each row beside the row below it
        top, bottom = rows[..., :w], rows[..., w:]
        # avg_pool2d's order of sums, ((a + b) + c) + d, so that the result is the same.
        out = top[..., 0::2] + top[..., 1::2]
        out += bottom[..., 0::2]
        out += bottom[..., 1::2]
        return out.mul_(0.25)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        n, c, h2, w2 = grad.shape
        cols = (grad * 0.25).unsqueeze(-1).expand(n, c, h2, w2, 2).reshape(n, c, h2, 1, 2 * w2)
        return cols.expand(n, c, h2, 2, 2 * w2).reshape(n, c, 2 * h2, 2 * w2)


@functools.lru_cache(maxsize=16)
def _pool_matrix(width: int, dtype: torch.dtype) -> torch.Tensor:
    """(2 * width, width // 2): a row pair laid end to end, times this, is the pair's 2x2 means."""
    rows = torch.arange(2 * width)
    matrix = torch.zeros(2 * width, width // 2, dtype=dtype)
    matrix[rows, (rows % width) // 2] = 0.25
    return matrix


class AvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2)``, computed faster for contiguous (NCHW) tensors on CPU, to the bit.

    PyTorch's CPU kernel for that layout is not vectorized: a (16, 128, 32, 32) fp32 batch pools
    in 3.8 ms forward and 6.8 ms backward, against 1.4 and 2.2 ms as the slice sums of
    :class:`_SumPool2x2`; in bf16, 4.1 and 6.4 ms against 0.4 and 1.3 ms as one matrix product
    with :func:`_pool_matrix` (bf16 elementwise sums are slow on CPU, oneDNN's bf16 products
    are not). One thread, measured on an AMD EPYC. Both sum the four values in ``avg_pool2d``'s
    order and precision, so results and gradients are identical to it, bit for bit.
    Channels-last tensors, odd sizes, other dtypes and devices, and compiled graphs (where
    TorchInductor fuses the pooling itself) use ``avg_pool2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or x.shape[-1] % 2
            or x.shape[-2] % 2
            or not x.is_contiguous()
            or x.dtype not in (torch.float32, torch.float64, torch.bfloat16)
            or torch.compiler.is_compiling()
        ):
            return F.avg_pool2d(x, 2)
        if x.dtype == torch.bfloat16:
            n, c, h, w = x.shape
            return x.view(n, c, h // 2, 2 * w) @ _pool_matrix(w, x.dtype)
        out: torch.Tensor = _SumPool2x2.apply(x)
        return out


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(width, width, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(width)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use 'instancenorm', 'batchnorm' or 'none'")


class MLP(nn.Module):
    """Two hidden layers of 128 units (the MLP of the DC paper's cross-architecture table)."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * image_size * image_size, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
        )
        self.embed_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 with batch norm (3x3 stem, no max-pool), as in the DC code base."""

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        del image_size  # global average pooling makes the head size-independent
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        in_ch = 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(in_ch, out_ch, stride), _BasicBlock(out_ch, out_ch, 1)]
            in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.embed_dim = 512
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": ConvNet,
    "convnet-bn": lambda channels, num_classes, image_size: ConvNet(
        channels, num_classes, image_size, norm="batchnorm"
    ),
    "mlp": MLP,
    "resnet18": ResNet18,
}


def make_model(
    name: str,
    channels: int,
    num_classes: int,
    image_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build a freshly initialized model by name (``convnet``, ``convnet-bn``, ``mlp``, ``resnet18``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    model = MODELS[name](channels, num_classes, image_size)
    init_parameters(model, generator)
    return model.to(device) if device is not None else model
