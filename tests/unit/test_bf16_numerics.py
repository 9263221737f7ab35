"""bf16 numerics of adder outputs and BN statistics with ImageNet-like statistics (issue 11 part 2).

Adder outputs on a trained ResNet-50 layer sit at y ≈ −4000 with a per-channel spread of ≈ 37. bf16's
rounding step there is 16-32, so a pre-BN adder output stored in bf16 loses most of what BN normalises,
and a bf16 running mean cannot follow the batch means. The setup below reproduces those statistics at
K = C·3·3 = 576 and 4608: post-ReLU activations (half zeros, the rest half-normal) and zero-mean filters,
scaled so the mean output is −4000; the spread then comes out at ~37 for K = 4608 (asserted).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.ops import adder2d

BF16_EPS = 2.0**-8  # bf16 relative rounding step (8 significant bits)


def _imagenet_like(c: int, n: int = 4, hw: int = 6, o: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, c, hw, hw, generator=gen))  # a BN → ReLU output
    w = torch.randn(o, c, 3, 3, generator=gen) * 0.5
    # E|x − w| estimated on samples of the tensors themselves; K·E|x − w|·s = 4000
    mean_abs = (x.flatten()[:4096, None] - w.flatten()[None, :512]).abs().mean()
    s = 4000.0 / (c * 9 * float(mean_abs))
    return x * s, w * s


def _bn_train(y: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(y, None, None, training=True, eps=1e-5)


@pytest.mark.timeout(120)
# K = 576 and 4608; the policy is the op layer's, the same for every backend (tests/unit/test_amp_policy.py):
# the reference (slow at K = 4608) runs the small layer only
@pytest.mark.parametrize("backend,c", [("reference", 64), ("cpu", 64), ("cpu", 512)])
def test_bn_normalised_bf16_path_agrees_with_fp32(backend, c):
    x, w = _imagenet_like(c)
    y32 = adder2d(x, w, padding=1, backend=backend)
    inner = y32[:, :, 1:-1, 1:-1]  # unpadded positions: the statistics of a real layer
    assert -4400 < float(inner.mean()) < -3600
    if c == 512:
        spread = float(inner.permute(1, 0, 2, 3).flatten(1).std(1).mean())
        assert 20 < spread < 60, spread  # ≈ 37, the spread of a trained layer
    z32 = _bn_train(y32)
    # The bf16 path: activations arrive in bf16 (autocast), filters are fp32 master weights.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = adder2d(x.bfloat16(), w, padding=1, backend=backend)
        z16 = _bn_train(y16)
    assert y16.dtype == z16.dtype == torch.float32
    err = float((z16 - z32).abs().max())
    # Only the input's bf16 rounding is left: δy ~ √K·|x|·2^-9 ≈ 0.1 against σ ≈ 37-60, i.e. ~1e-3 in
    # normalised units; one bf16 step at |z| ≈ 3 is 3·2^-8 ≈ 0.012.
    assert err < 3 * BF16_EPS, err
    # What the policy prevents: the same output rounded to bf16 before BN (steps of 16-32 at 4000).
    z_rounded = _bn_train(y16.bfloat16().float())
    err_rounded = float((z_rounded - z32).abs().max())
    assert err_rounded > 10 * err, (err_rounded, err)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("c", [64, 512])
def test_bf16_run_running_means_track_fp32(c):
    """Ten training batches through Adder2d → BatchNorm2d: the running means of the bf16 autocast run
    follow the fp32 run's; bf16 buffers (DeepSpeed's old buffer_dtype) would not."""
    torch.manual_seed(1)
    bn32, bn16 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
    mean16_buffer = torch.zeros(8, dtype=torch.bfloat16)  # a bf16 running mean, updated like BN's
    for step in range(10):
        x, w = _imagenet_like(c, seed=step % 3)
        x = x * (1 + 0.01 * step)  # a drifting layer: the running mean must move
        bn32(adder2d(x, w, padding=1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = adder2d(x.bfloat16(), w, padding=1)
            bn16(y)
        batch_mean = y.mean((0, 2, 3))
        mean16_buffer = (0.9 * mean16_buffer.float() + 0.1 * batch_mean).bfloat16()
    assert bn16.running_mean.dtype == bn16.running_var.dtype == torch.float32
    sigma = float(bn32.running_var.sqrt().mean())
    drift = float((bn16.running_mean - bn32.running_mean).abs().max())
    assert drift < 0.01 * sigma, (drift, sigma)
    torch.testing.assert_close(bn16.running_var, bn32.running_var, rtol=1e-2, atol=0)
    bf16_drift = float((mean16_buffer.float() - bn32.running_mean).abs().max())
    assert bf16_drift > 10 * drift, (bf16_drift, drift)
