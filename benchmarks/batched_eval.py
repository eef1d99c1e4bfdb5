"""Should one evaluation's networks train in one batched step? Measured, not assumed.

The evaluation protocol trains 3 fresh ConvNets on the same synthetic set. Here, one SGD step
(momentum 0.9, weight decay 5e-4) of 3 ConvNets on 100 MNIST-sized images each, two ways in
the same process: one network after another (what :func:`fedcl_dd.evaluate.evaluate` does),
and the 3 stacked into one ``torch.func.vmap`` over ``functional_call`` (PyTorch turns the
batched weights into grouped convolutions). Median seconds per step over ``--steps`` after
a warm-up, and the largest difference between the two ways' weights after those steps.
Evaluation stays sequential where the batched step is not faster on the device measured.

    OMP_NUM_THREADS=1 python benchmarks/batched_eval.py --json benchmarks/results/batched_eval_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from machine import machine
from torch.func import functional_call, stack_module_state, vmap

from fedcl_dd.allocator import keep_freed_memory
from fedcl_dd.io import write_json
from fedcl_dd.models import make_model


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nets", type=int, default=3)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="benchmarks/results/batched_eval_cpu.json")
    args = p.parse_args()
    keep_freed_memory()
    dev = torch.device(args.device)
    k, b = args.nets, args.images
    nets = [
        make_model("convnet", 1, 10, 28, torch.Generator().manual_seed(i), dev) for i in range(k)
    ]
    stacked, buffers = stack_module_state(nets)  # copies, before any step changes the nets
    params = {name: t.detach().clone().requires_grad_() for name, t in stacked.items()}
    shell = copy.deepcopy(nets[0]).to("meta")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(k, b, 1, 28, 28, generator=gen).to(dev)
    y = torch.randint(0, 10, (k, b), generator=gen).to(dev)

    def sgd(tensors: list[torch.Tensor]) -> torch.optim.SGD:
        return torch.optim.SGD(tensors, lr=0.01, momentum=0.9, weight_decay=5e-4)

    opts = [sgd(list(n.parameters())) for n in nets]
    opt = sgd(list(params.values()))

    def one_by_one() -> None:
        for i, (net, o) in enumerate(zip(nets, opts, strict=True)):
            loss = F.cross_entropy(net(x[i]), y[i])
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    def forward(p: dict, bufs: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(shell, (p, bufs), (xb,))

    def batched() -> None:
        logits = vmap(forward)(params, buffers, x)
        # The sum of the networks' mean losses: each network's gradient is its own.
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / b
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn: Callable[[], None]) -> list[float]:
        out = []
        for _ in range(args.steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
        return out

    # Interleaved, after one warm-up step each, so drift on a shared machine hits both.
    one_by_one()
    batched()
    seq, bat = [], []
    for _ in range(2):
        seq += timed(one_by_one)
        bat += timed(batched)
    diff = max(
        (params[name][i] - dict(net.named_parameters())[name]).abs().max().item()
        for i, net in enumerate(nets)
        for name in params
    )
    s, v = statistics.median(seq), statistics.median(bat)
    print(f"{k} ConvNets, {b} images each, {dev}, {torch.get_num_threads()} threads")
    print(f"one by one: {s:.3f} s/step   vmap: {v:.3f} s/step   vmap speed-up {s / v:.2f}x")
    print(f"largest weight difference after {2 * args.steps + 1} steps: {diff:.2e}")
    write_json(
        {
            "machine": machine(),
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "nets": k,
            "images": b,
            "one_by_one_seconds": s,
            "vmap_seconds": v,
            "vmap_speedup": s / v,
            "max_weight_difference": diff,
            "command": "python benchmarks/batched_eval.py " + " ".join(sys.argv[1:]),
            "targets": [],  # the issue names no target here: it asks which way is faster
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
