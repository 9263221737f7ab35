"""The eval-comparison precondition itself (tests/logit_checks.py): it fails on the constant logits
that made eval comparisons vacuous (issue 16) and passes on the models the comparisons use."""

from __future__ import annotations

import pytest
import torch

from addernet_dist.models import create_model
from tests.logit_checks import assert_logits_vary, logit_spread, spread_model


@pytest.mark.timeout(60)
def test_constant_logits_after_one_momentum_forward_are_refused():
    # The old recipe: one train forward with momentum 0.1, then eval. Every feature is 0 after
    # the ReLUs, the logits are fc.bias for every image.
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, backend="reference")
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        model.train()(x)
        logits = model.eval()(x)
    assert logit_spread(logits) < 1e-6
    with pytest.raises(AssertionError, match="constant across images"):
        assert_logits_vary(logits)
    with pytest.raises(AssertionError, match="distinct top-1"):
        assert_logits_vary(torch.randn(8, 10) + torch.tensor([0.0] * 9 + [100.0]))


@pytest.mark.timeout(120)
def test_spread_model_gives_varying_logits_resnet18_setup_of_the_gpu_test():
    # tests/gpu/test_triton_gpu.py::test_fused_resnet18_matches_unfused on CPU (smaller images): the
    # precondition it asserts holds by construction.
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, backend="reference")
    x = torch.randn(4, 3, 32, 32)
    spread_model(model, x)
    assert not model.training
    with torch.no_grad():
        logits = model(x)
    assert_logits_vary(logits)
    assert any(
        m.bias.abs().min() > 0 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
