"""The reference operator's extra-memory bound, measured in a fresh process (peak RSS − RSS before)."""

from __future__ import annotations

import textwrap

import pytest

from tests.train_helpers import script_json

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(2)
    which, n = sys.argv[1], int(sys.argv[2])

    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    # ResNet-50 stage-1 3x3 adder layer (64 -> 64, 56x56, pad 1) at batch n
    x = torch.randn(n, 64, 56, 56, requires_grad=True)
    w = torch.randn(64, 64, 3, 3, requires_grad=True)
    g = torch.randn(n, 64, 56, 56)
    before = rss_now()
    if which == "reference":
        from addernet_dist.ops.reference import adder2d_reference
        y = adder2d_reference(x, w, padding=1, p=1.5)
        y.backward(g)
    else:  # the original AdderNet algorithm: unfold, then the (Cout x K x N*L) broadcast
        cols = torch.nn.functional.unfold(x.detach(), 3, padding=1)            # (N, K, L)
        x_col = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)               # (K, N*L)
        y = -(x_col.unsqueeze(0) - w.detach().reshape(64, -1).unsqueeze(2)).abs().sum(1)
    # VmHWM: this process's own high-water mark. ru_maxrss is carried over fork+exec from the
    # parent (pytest, >1 GB late in the suite), which measured 1116 MiB here for a 200 MiB layer.
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024
    print(json.dumps({"extra_bytes": peak - before}))
    """
)


def _extra_bytes(which: str, batch: int) -> int:
    return script_json(SCRIPT, which, str(batch), timeout=600)["extra_bytes"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resnet50_stage1_layer_batch8_under_1gb_extra():
    extra = _extra_bytes("reference", 8)  # measured: 429 MiB
    # bound stated in ops/reference.py: unfolded input (58 MiB) + its gradient + output/grad buffers
    # (~26 MiB each) + at most three 64 MiB chunk blocks; 1 GB leaves room for allocator slack.
    assert extra < 1 * 1024**3, f"{extra / 2**20:.0f} MiB extra"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_measurement_catches_the_original_broadcast():
    # Control: the original code's broadcast must show up — at batch 2 it is 64 × 576 × 6,272 floats
    # = 0.92 GB, twice over (the difference and its abs), so well above the 1 GB bound above.
    assert _extra_bytes("original", 2) > 1.5 * 1024**3
