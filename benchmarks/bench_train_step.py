"""Cost of one training iteration of the DDP engine (1 process), and of its parts:

* the p of the lp schedule: a fractional p needs pow() in the adder operator, p = 1 and p = 2 not;
* eq. 33 adaptive LR scaling (global scope): one fused norm + multiply over the adder grads.

    python benchmarks/bench_train_step.py [--model resnet8] [--batch 32] [--size 32] [--iters 5]

Prints the median step time (forward + backward + engine.step) per setting and its ratio to the
baseline (p = 1, adaptive LR on) measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from addernet_dist.config import load_config
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.ddp import DDPEngine
from addernet_dist.models import create_model
from addernet_dist.nn import set_p
from addernet_dist.ops import dispatch


def time_steps(model_name: str, batch: int, size: int, p: float, adaptive: bool, iters: int):
    cfg = load_config(
        None,
        [
            f"model.name={model_name}",
            f"adder.adaptive_lr={str(adaptive).lower()}",
            "train.device=cpu",
        ],
    )
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    set_p(model, p)
    engine = DDPEngine(model, cfg, DistInfo(), steps_per_epoch=100)
    x, y = torch.randn(batch, 3, size, size), torch.randint(10, (batch,))
    times = []
    for i in range(iters + 1):
        t = time.perf_counter()
        engine.forward_backward(x, y)
        engine.step()
        if i:  # the first step pays one-time costs (allocator, kernel caches)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    dispatch.set_default_backend(args.backend)
    torch.set_num_threads(1)
    settings = [(1.0, True), (1.0, False), (1.5, True), (2.0, True)]
    base = None
    print(
        f"{args.model} batch {args.batch} {args.size}x{args.size}, backend {args.backend}, 1 thread"
    )
    print("| p | adaptive LR | step (ms) | vs p=1, adaptive on |\n|---|---|---|---|")
    for p, adaptive in settings:
        t = time_steps(args.model, args.batch, args.size, p, adaptive, args.iters)
        base = base or t
        print(f"| {p:g} | {'on' if adaptive else 'off'} | {t * 1e3:.0f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
