"""The networks: the papers' sizes, embeddings, reproducible initialization."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcl_dd.models import AvgPool2x2, conv2d, make_model


@pytest.mark.parametrize(
    "channels,size,params",
    [(1, 28, 317_706), (3, 32, 320_010)],  # the DC/DM ConvNet: ~318k (MNIST), ~320k (CIFAR-10)
)
def test_convnet_matches_the_papers(channels, size, params):
    net = make_model("convnet", channels, 10, size)
    assert sum(p.numel() for p in net.parameters()) == params
    x = torch.randn(2, channels, size, size)
    assert net.embed(x).shape == (2, 2048)  # 128 x 4 x 4 for both datasets
    assert net(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["convnet", "convnet-bn", "mlp", "resnet18"])
@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_every_model_runs_on_every_dataset_shape(name, channels, size):
    net = make_model(name, channels, 10, size)
    x = torch.randn(3, channels, size, size)
    assert net(x).shape == (3, 10)
    assert net.embed(x).shape == (3, net.embed_dim)


def test_initialization_follows_the_generator_not_the_global_rng():
    a = make_model("convnet", 1, 10, 28, torch.Generator().manual_seed(3))
    torch.rand(100)  # moving the global RNG must change nothing
    b = make_model("convnet", 1, 10, 28, torch.Generator().manual_seed(3))
    c = make_model("convnet", 1, 10, 28, torch.Generator().manual_seed(4))
    for pa, pb, _pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*convnet"):
        make_model("vgg", 1, 10, 28)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_accuracy_counts_as_the_plain_forward_and_leaves_the_model_as_it_was(name):
    """accuracy() runs its forward pass in channels-last on CPU (faster there): it must count
    what the plain forward predicts and hand the model back in its layout and mode."""
    from fedcl_dd.evaluate import accuracy

    gen = torch.Generator().manual_seed(0)
    net = make_model(name, 1, 10, 16, gen).train()
    x, y = torch.randn(300, 1, 16, 16, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    net.eval()
    with torch.no_grad():
        plain = net(x).argmax(1)
    net.train()
    assert accuracy(net, x, y, batch_size=128) == pytest.approx(float((plain == y).float().mean()))
    assert net.training
    assert all(p.is_contiguous() for p in net.parameters())


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 5),
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    channels_last=st.booleans(),
)
def test_avg_pool_2x2_is_avg_pool2d_forward_and_backward(n, c, h, w, dtype, channels_last):
    # The fast paths (slice sums, a matrix product) against PyTorch's kernel, bit for bit: odd
    # sizes and channels-last fall back to it.
    gen = torch.Generator().manual_seed(n * 1000 + c * 100 + h * 10 + w)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = AvgPool2x2()(ours), F.avg_pool2d(ref, 2)
    grad = torch.randn(expected.shape, generator=gen).to(dtype)
    out.backward(grad)
    expected.backward(grad)
    assert out.dtype == dtype
    assert torch.equal(out, expected)  # the same sums in the same order
    assert torch.equal(ours.grad, ref.grad)


def test_avg_pool_2x2_gradients_and_vmap():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(AvgPool2x2(), (x,))
    batch = torch.randn(4, 2, 3, 6, 4)
    torch.testing.assert_close(
        torch.func.vmap(AvgPool2x2())(batch),
        F.avg_pool2d(batch.flatten(0, 1), 2).view(4, 2, 3, 3, 2),
    )


def _out_and_grads(params, x, autocast, through):
    """``through(x)`` as fp32, and the gradients of the input and of ``params`` of a weighted
    sum of it."""
    for p in params:
        p.grad = None
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = through(x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weights).sum().backward()
    return [out.float(), x.grad] + [p.grad.clone() for p in params]


def _assert_close(ours, plain, autocast):
    tol = 2e-2 if autocast else 1e-5
    largest = max(b.abs().max().item() for b in plain)
    for a, b in zip(ours, plain, strict=True):
        assert a.dtype == b.dtype
        # A gradient that is rounding noise around zero (a bias before instance norm) is
        # compared at the scale of the largest one.
        assert torch.allclose(a, b, rtol=tol, atol=tol * largest)


@pytest.mark.parametrize("channels, size, padding", [(1, 28, 3), (3, 32, 1), (16, 8, 1)])
@pytest.mark.parametrize("autocast", [False, True])
def test_convolution_with_the_bias_summed_apart_is_the_module(channels, size, padding, autocast):
    """models.conv2d (the ConvNet's convolutions on CPU): the output and the gradients of the
    input, weight and bias are the module's (fp32: to rounding; bf16 autocast: to its own)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 8, 3, padding=padding)
    x = torch.randn(5, channels, size, size)
    params = [conv.weight, conv.bias]
    ours = _out_and_grads(params, x, autocast, lambda t: conv2d(conv, t))
    plain = _out_and_grads(params, x, autocast, conv)
    assert ours[-1].abs().max() > 1  # the bias gradient is a real one here
    _assert_close(ours, plain, autocast)


@pytest.mark.parametrize("autocast", [False, True])
def test_convnet_embed_is_its_layers_called_as_modules(autocast):
    net = make_model("convnet", 1, 10, 28, torch.Generator().manual_seed(0))
    x = torch.randn(6, 1, 28, 28)
    params = list(net.features.parameters())
    ours = _out_and_grads(params, x, autocast, net.embed)
    plain = _out_and_grads(params, x, autocast, lambda t: net.features(t).flatten(1))
    _assert_close(ours, plain, autocast)


def test_convnet_embed_calls_a_hooked_convolution_itself():
    """Opacus computes per-sample gradients with module hooks: a hooked convolution must be
    called as a module, so its hooks fire."""
    net = make_model("convnet", 1, 10, 28, torch.Generator().manual_seed(0))
    calls = []
    net.features[0].register_forward_hook(lambda *args: calls.append(1))
    net.embed(torch.randn(2, 1, 28, 28))
    assert calls == [1]
