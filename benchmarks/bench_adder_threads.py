"""Two-thread / one-thread wall-time speed-up of the CPU adder fast path and of F.conv2d, per layer.

Best of ``repeat`` wall times per (method, fwd or fwd+bwd, thread count), the one-thread and two-thread calls
in separate phases (see bench_adder._time_both_clocks: torch's spinning OpenMP worker after a two-thread op
otherwise disturbs the next one-thread call), methods interleaved within a phase. On a machine shared with
other jobs take many repeats: the best-of picks the quiet moments, and a row where conv does not scale
either was not measured quietly.

    python benchmarks/bench_adder_threads.py --repeat 20
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from addernet_dist.ops import adder2d

# (cin, cout, hw, k, stride, pad): ResNet-50 layers (batch 2) — 1×1 at 14×14 and 7×7, a 14×14 3×3, a 56×56
# 3×3 and a strided 1×1
SHAPES = [(1024, 256, 14, 1, 1, 0), (256, 256, 14, 3, 1, 1), (64, 64, 56, 3, 1, 1), (2048, 512, 7, 1, 1, 0),
          (512, 1024, 28, 1, 2, 0)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    n = args.batch
    for cin, cout, hw, k, s, pd in SHAPES:
        x, w = torch.randn(n, cin, hw, hw), torch.randn(cout, cin, k, k)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        ho = (hw + 2 * pd - k) // s + 1
        gy = torch.randn(n, cout, ho, ho)
        fns = {
            "adder": lambda a, b, s=s, pd=pd: adder2d(a, b, s, pd, 1, 1.0, backend="cpu"),
            "conv": lambda a, b, s=s, pd=pd: F.conv2d(a, b, None, s, pd),
        }
        best: dict[tuple, float] = {}
        for t in (1, 2):
            torch.set_num_threads(t)
            time.sleep(0.2)
            for _ in range(args.repeat):
                for m, f in fns.items():
                    for kind in ("f", "fb"):
                        t0 = time.perf_counter()
                        if kind == "f":
                            with torch.no_grad():
                                f(x, w)
                        else:
                            xg.grad = wg.grad = None
                            f(xg, wg).backward(gy)
                        key = (m, kind, t)
                        best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
        cols = [f"{m} {kind} 1T {best[(m, kind, 1)] * 1e3:.2f} ms, 2T/1T {best[(m, kind, 1)] / best[(m, kind, 2)]:.2f}"
                for m in fns for kind in ("f", "fb")]  # fmt: skip
        print(f"{cin}->{cout} {hw}x{hw} k{k} s{s}, batch {n}: " + "; ".join(cols), flush=True)


if __name__ == "__main__":
    main()
