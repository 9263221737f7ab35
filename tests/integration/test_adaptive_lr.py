"""Eq. 33 adaptive LR scaling on the GLOBAL gradient: 2 ranks x batch B update exactly like
1 rank x batch 2B; the original per-rank ("local") normalisation does not.

Why the 1-process and 2-process forwards are mathematically identical here: the model runs in
eval mode, so BatchNorm normalises with its running statistics (a fixed per-channel affine map)
instead of per-rank batch statistics; every sample's logits then depend on that sample only, the
mean loss over 2B samples is the mean of the two ranks' mean losses over B, and DDP's averaged
gradient equals the full-batch gradient. fp64 makes "equal" testable to 1e-10 (fp32 summation
order alone differs at ~1e-6 between the two layouts).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from addernet_dist.adaptive_lr import AdaptiveLRScaler
from addernet_dist.config import load_config
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.engine.ddp import DDPEngine
from addernet_dist.models import create_model
from addernet_dist.nn import adder_modules, set_p
from tests.train_helpers import DEBUG_CONFIG, launch_workers

GLOBAL_BATCH = 12
STEPS = 2  # the second step also exercises the Nesterov momentum buffers


def _batch():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(10, (GLOBAL_BATCH,), generator=g)
    return x, y


def _updated_state(scope: str, dist: DistInfo) -> dict[str, torch.Tensor]:
    """Weights after STEPS engine steps on this rank's slice of the fixed global batch."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).double()
    set_p(model, 2.0)  # p only shapes the gradients; 2 avoids the slow pow() path of a fractional p
    # Running stats = the statistics of the whole global batch (every process computes them on
    # all 12 samples before sharding), so eval-mode BN is the same fixed affine map everywhere and
    # keeps activations in range (adder outputs are O(-K); arbitrary stats would zero the ReLUs).
    x, y = _batch()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets running = batch statistics
    with torch.no_grad():
        model.train()(x)
    cfg = load_config(DEBUG_CONFIG, [f"adder.adaptive_scope={scope}", "adder.backend=reference"])
    engine = DDPEngine(model, cfg, dist, steps_per_epoch=12)
    engine.eval()
    per = GLOBAL_BATCH // dist.world_size
    sl = slice(dist.rank * per, (dist.rank + 1) * per)
    for _ in range(STEPS):
        engine.forward_backward(x[sl], y[sl])
        stats = engine.step()
    k = torch.tensor([m.weight.numel() for m in adder_modules(model)], dtype=torch.float64)
    if scope == "global":
        # the factors applied are eq. 33's, on the norms of the (global) gradient
        prod = stats.adder_alphas.double() * stats.adder_grad_norms
        assert torch.allclose(prod, 0.1 * k.sqrt()), (prod, k)
    state = engine.unwrap().state_dict()
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _worker(out: str) -> None:
    dist = init_distributed("cpu")
    try:
        states = {scope: _updated_state(scope, dist) for scope in ("global", "local")}
        if dist.rank == 0:
            torch.save(states, Path(out) / "two_ranks.pt")
    finally:
        destroy_distributed(dist)


def _adder_weight_keys(state) -> list[str]:
    model = create_model("resnet8", num_classes=10)
    names = [n for n, m in model.named_modules() if m in adder_modules(model)]
    return [f"{n}.weight" for n in names]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_global_norm_is_world_size_invariant_and_local_is_not(tmp_path):
    launch_workers(__name__, [str(tmp_path)], nproc=2)
    two = torch.load(tmp_path / "two_ranks.pt")
    one = {scope: _updated_state(scope, DistInfo()) for scope in ("global", "local")}
    keys = _adder_weight_keys(one["global"])
    assert len(keys) == 8

    # 2 ranks x 6 == 1 rank x 12 for every parameter and buffer, eq. 33 included.
    for k, v in one["global"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["global"][k], v, rtol=1e-10, atol=1e-10, msg=k)
    # On one process the local hook is the same math as the global scaling ...
    for k in keys:
        torch.testing.assert_close(one["local"][k], one["global"][k], rtol=1e-10, atol=1e-10)
    # ... but with 2 ranks it normalises each half-batch gradient separately, so the update
    # moves: mean_r(g_r / |g_r|) != g / |g|.
    diffs = [(two["local"][k] - one["global"][k]).abs().max().item() for k in keys]
    assert min(diffs) > 1e-3, diffs


@pytest.mark.timeout(60)
def test_scaler_sets_each_adder_grad_norm_to_eta_sqrt_k():
    model = create_model("resnet8", num_classes=10)
    x = torch.randn(4, 3, 8, 8)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    adders = adder_modules(model)
    others = {n: p.grad.clone() for n, p in model.named_parameters() if "fc" in n or "bn" in n}
    raw = [m.weight.grad.clone() for m in adders]
    norms, alphas = AdaptiveLRScaler(adders, eta=0.2).scale_()
    for m, g0, n, a in zip(adders, raw, norms, alphas):
        k = m.weight.numel()
        assert n.item() == pytest.approx(g0.norm().item(), rel=1e-5)
        assert a.item() == pytest.approx(0.2 * math.sqrt(k) / g0.norm().item(), rel=1e-5)
        assert m.weight.grad.norm().item() == pytest.approx(0.2 * math.sqrt(k), rel=1e-5)
        # direction unchanged
        assert torch.allclose(m.weight.grad, g0 * a, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p.grad, others[n]), f"{n} is not an adder weight but was scaled"


@pytest.mark.timeout(30)
def test_zero_gradient_stays_zero_not_nan():
    layer = create_model("resnet8", num_classes=10)
    adders = adder_modules(layer)[:2]
    for m in adders:
        m.weight.grad = torch.zeros_like(m.weight)
    AdaptiveLRScaler(adders, eta=0.1).scale_()
    assert all(torch.equal(m.weight.grad, torch.zeros_like(m.weight)) for m in adders)


@pytest.mark.timeout(30)
def test_missing_gradient_is_a_clear_error():
    adders = adder_modules(create_model("resnet8", num_classes=10))
    with pytest.raises(RuntimeError, match=r"adder layers \[0, 1, .*\] have no gradient"):
        AdaptiveLRScaler(adders, eta=0.1).scale_()


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_eq33_alpha_is_one_function_both_engines_call():
    # Eq. 33 lives in adaptive_lr.adaptive_alpha: the scaler (DDP engine, both scopes) and the
    # DeepSpeed engine's ZeRO gradient processor get their factors from it.
    from addernet_dist.adaptive_lr import adaptive_alpha
    from addernet_dist.engine.deepspeed import _alpha_fn

    norms = torch.tensor([2.0, 0.0, 0.5])
    sqrt_k = torch.tensor([3.0, 4.0, 5.0])
    # eta * sqrt(k) / ||g||, and an all-zero gradient gets 0 * inf -> a finite factor, not NaN.
    torch.testing.assert_close(adaptive_alpha(0.1, sqrt_k, norms)[[0, 2]], torch.tensor([0.15, 1.0]))
    assert torch.isfinite(adaptive_alpha(0.1, sqrt_k, norms)).all()
    layers = [torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(4, 4, bias=False)]  # k = 9, 16
    scaler = AdaptiveLRScaler(layers, eta=0.2)
    n = torch.tensor([0.3, 7.0])
    expected = torch.tensor([0.2 * 3.0 / 0.3, 0.2 * 4.0 / 7.0])
    torch.testing.assert_close(scaler.alphas(n), expected)
    assert torch.equal(_alpha_fn(scaler)(n), scaler.alphas(n))
