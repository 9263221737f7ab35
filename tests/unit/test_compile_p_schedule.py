"""torch.compile with the ℓp schedule: p moves every step without recompiling, and the compiled model
computes with the current p (Dynamo only, backend="eager": what is tested is tracing and guards, not
Inductor's code generation, which the 2-core CI box cannot afford per test)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from addernet_dist.models import create_model
from addernet_dist.nn import set_p


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_p_schedule_does_not_recompile_and_uses_the_current_p(backend):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 3, 8, 8)

    def step(p: float, fn) -> tuple[torch.Tensor, torch.Tensor]:
        set_p(model, p)
        model.zero_grad(set_to_none=True)
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), model.conv1.weight.grad.clone()

    step(2.0, compiled)  # warm-up: the graphs between the adder layers are built here
    step(1.9, compiled)  # (and shape-driven recompiles of shared block code, once)
    frames = counters["frames"]["total"]
    for p in (1.8, 1.55, 1.3, 1.05, 1.0, 1.0):
        y_c, g_c = step(p, compiled)
        y_e, g_e = step(p, model)
        torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)  # the current p, not a baked-in one
        torch.testing.assert_close(g_c, g_e, rtol=0, atol=0)
    assert counters["frames"]["total"] == frames, "a new p recompiled the model"
    torch._dynamo.reset()
