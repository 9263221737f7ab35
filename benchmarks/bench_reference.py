"""The reference operator vs ``torch.cdist(p=1)`` on unfolded patches (issue: the reference must not be
slower), forward and forward+backward, interleaved repeats, min time. CPU, fp32.

    python benchmarks/bench_reference.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from addernet_dist.ops.reference import adder2d_reference

# (name, N, Cin, Cout, H, k, stride): ResNet-20 (CIFAR, batch 32) and the ResNet-50 stage-1 3×3 layer.
SHAPES = [
    ("r20-s1", 32, 16, 16, 32, 3, 1),
    ("r20-s2", 32, 32, 32, 16, 3, 1),
    ("r20-s3", 32, 64, 64, 8, 3, 1),
    ("r20-down", 32, 16, 32, 32, 3, 2),
    ("r50-l1-b8", 8, 64, 64, 56, 3, 1),
]


def _cdist(x, w, stride, train):
    cols = F.unfold(x, w.shape[2:], padding=1, stride=stride)  # (N, K, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    y = -torch.cdist(rows, w.reshape(w.shape[0], -1), p=1.0)
    if train:
        y.sum().backward()


def _ref(x, w, stride, train, grad_x="lp"):
    y = adder2d_reference(x, w, stride, 1, grad_x=grad_x)
    if train:
        y.sum().backward()


def _ref_ht(x, w, stride, train):
    _ref(x, w, stride, train, grad_x="hardtanh")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| layer | mode | cdist p=1 (ms) | reference (ms) | ref vs cdist | ref hardtanh (ms) | vs cdist |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, n, cin, cout, h, k, s in SHAPES:
        for train in (False, True):
            x = torch.randn(n, cin, h, h, requires_grad=train)
            w = torch.randn(cout, cin, k, k, requires_grad=train)
            best = {"cdist": float("inf"), "ref": float("inf"), "ht": float("inf")}
            fns = (("cdist", _cdist), ("ref", _ref)) + ((("ht", _ref_ht),) if train else ())
            for _ in range(args.repeats):  # interleaved: all see the same machine load
                for key, fn in fns:
                    t0 = time.perf_counter()
                    fn(x, w, s, train)
                    best[key] = min(best[key], time.perf_counter() - t0)
            mode = "fwd+bwd" if train else "fwd"
            print(
                f"| {name} | {mode} | {best['cdist'] * 1e3:.1f} | {best['ref'] * 1e3:.1f} | "
                f"{best['cdist'] / best['ref']:.2f}× | "
                + (
                    f"{best['ht'] * 1e3:.1f} | {best['cdist'] / best['ht']:.2f}× |"
                    if train
                    else "- | - |"
                )
            )


if __name__ == "__main__":
    main()
