"""Preconditions for eval-mode comparisons: the logits must depend on the image.

Why: after one training forward with BN momentum 0.1 (or on an untrained model) the running
statistics leave every feature at zero after the ReLUs, so the logits equal ``fc.bias`` for every
image. Top-1/top-5/loss then depend only on the label counts, and a comparison of two models (fused
vs unfused, 2 ranks vs 1, DALI vs torchvision) passes whatever the models compute — a negated BN
shift and labels shifted by one both went unnoticed that way (issue 16). Every eval-mode comparison
calls ``assert_logits_vary`` on what it compares, and builds its model with ``set_bn_stats_from``
(or trains it) so that the precondition holds.
"""

from __future__ import annotations

import torch
from torch import nn

# Relative spread across images below which logits count as constant. Constant logits measure
# ~1e-7 (float rounding of fc.bias); the models the tests use measure 0.05-1.
MIN_RELATIVE_SPREAD = 1e-3


def logit_spread(logits: torch.Tensor) -> float:
    """Mean over classes of the std across images, relative to the logits' magnitude.

    logits: (N, C) or (N, ...) float; N >= 2 images."""
    x = logits.detach().double().flatten(1)
    across_images = x.std(0).mean()
    scale = x.abs().mean().clamp_min(1e-12)
    return float(across_images / scale)


def assert_logits_vary(logits: torch.Tensor, *, min_distinct_top1: int = 2) -> None:
    """Fail when the logits are (nearly) the same for every image, or when fewer than
    ``min_distinct_top1`` classes are ever predicted (a top-1 comparison would then only count
    labels)."""
    assert logits.shape[0] >= 2, f"need >= 2 images to measure a spread, got {tuple(logits.shape)}"
    spread = logit_spread(logits)
    assert spread > MIN_RELATIVE_SPREAD, (
        f"logits are constant across images (relative spread {spread:.2e}): an eval-mode comparison "
        "on them compares nothing; set BN statistics from data or train the model first"
    )
    if logits.dim() == 2 and min_distinct_top1 > 1:
        distinct = logits.argmax(1).unique().numel()
        assert distinct >= min_distinct_top1, (
            f"only {distinct} distinct top-1 classes over {logits.shape[0]} images"
        )


@torch.no_grad()
def set_bn_stats_from(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact batch statistics of ``images``
    (a cumulative average over one batch), so eval mode normalises like train mode on that data.
    Written here rather than calling metrics.recalibrate_bn: the tests of that function must not
    depend on it. Returns ``model`` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(images)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def spread_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give ``model`` (any device) eval-mode outputs that depend on the image and on every BN
    parameter: BN affine parameters off their (1, 0) init (a negated shift is invisible with
    beta = 0), running statistics from ``x`` (the init's (0, 1) zeroes every feature after the ReLUs, so the logits
    would be fc.bias for every image), fc.bias shrunk so the features pick the top-1.
    Returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g).to(m.weight) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g).to(m.bias) - 0.5)
        set_bn_stats_from(model, x)
        fc = getattr(model, "fc", None)
        if isinstance(fc, nn.Linear) and fc.bias is not None:
            fc.bias.mul_(0.05)
    return model


@torch.no_grad()
def checkpoint_val_logits(path, *, batch_size: int = 20) -> torch.Tensor:
    """Eval-mode logits of the model saved in a trainer (or converted DeepSpeed) checkpoint on the
    first ``batch_size`` images of its config's val split, computed with the reference operator in
    fp32: the precondition of comparing two evaluations of that checkpoint (logged vs addernet-eval,
    one backend vs another) is ``assert_logits_vary`` on these."""
    from addernet_dist import checkpoint
    from addernet_dist.build import build_model
    from addernet_dist.config import config_from_dict
    from addernet_dist.data import build_loader
    from addernet_dist.ops import dispatch

    state = checkpoint.load_file(path)
    cfg = config_from_dict(state["client"]["config"])
    saved = dispatch._default
    dispatch.set_default_backend("reference")
    try:
        loader = build_loader(cfg.data, "val", batch_size=batch_size)
        images, _ = next(iter(loader))
        model = build_model(cfg, loader.num_classes)
        model.load_state_dict(state["engine"]["model"])
        return model.eval()(images)
    finally:
        dispatch._default = saved
