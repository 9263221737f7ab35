"""Top-1 / top-5 accuracy and exact distributed evaluation.

Exactness: the eval loader hands every rank a shard in which padded duplicates carry label
``IGNORE_LABEL`` (-1). Each rank sums integer counts (correct@1, correct@5, valid samples) and the
summed loss; one all-reduce of those sums gives the result for the whole split, every sample
counted once. The counts are integers held in float64 (exact up to 2**53 samples), so top-1/top-5
with 2 ranks equal the 1-process values exactly on the same weights.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.data import IGNORE_LABEL
from addernet_dist.device_policy import autocast
from addernet_dist.distributed import DistInfo


@dataclass(frozen=True)
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, num_classes))
    loss: float  # mean cross-entropy over the valid samples
    count: int  # valid samples counted (the split size)

    def as_dict(self, prefix: str = "val/") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def upcast_logits(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits -> fp32 for the loss; fp32/fp64 stay as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)):
    """Number of valid rows whose label is in the top-k logits, for each k.

    logits: (B, C) float; labels: (B,) int64 with IGNORE_LABEL rows skipped.
    Returns an int64 tensor (len(ks),) on the logits' device; k is capped at C.
    """
    valid = labels != IGNORE_LABEL
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == labels[:, None]
    hit &= valid[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    dist: DistInfo,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Distributed exact evaluation of ``model`` on ``loader`` (collective: every rank calls it).

    autocast_dtype: e.g. torch.bfloat16 (``Engine.autocast_dtype``); None evaluates in the model's dtype.
    """
    was_training = model.training
    model.eval()
    # [loss sum, correct@1, correct@5, valid count]; float64 keeps the integer counts exact.
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)
    for images, labels in loader:
        with autocast(dist.device.type, autocast_dtype):
            logits = model(images)
        logits = upcast_logits(logits)
        valid = labels != IGNORE_LABEL
        loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="sum")
        sums[0] += loss_sum.double()
        sums[1:3] += topk_correct(logits, labels, (1, 5)).double()
        sums[3] += valid.sum().double()
    dist.all_reduce_sum_(sums)
    model.train(was_training)
    loss_sum, c1, c5, n = sums.tolist()
    if n == 0:
        raise RuntimeError("the validation split produced no samples; check data.val_split")
    return EvalResult(top1=100.0 * c1 / n, top5=100.0 * c5 / n, loss=loss_sum / n, count=int(n))


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches,
    dist: DistInfo,
    *,
    num_batches: int,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Recompute every BatchNorm's running statistics from ``num_batches`` batches of ``batches``
    (an iterable of ``(images, labels)``), at the model's current weights and p; collective.

    Why: during the ℓp → ℓ1 decay an adder layer's output scale moves with p at every step, and
    the running statistics (momentum 0.1: an average over the last ~10 steps) lag behind it, so a
    mid-decay evaluation judges the model with stale statistics — 53.5% instead of 88.3% top-1 on
    the 3-epoch Fashion-MNIST run (REPRODUCTION.md). Each rank takes a cumulative average
    (``momentum=None``) over its own batches, then the ranks' averages are averaged, so every rank
    ends with the same statistics. Returns the number of batches used (per rank).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or num_batches <= 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    used = 0
    try:
        # islice: a DataLoader/DALI iterator is not asked for (and does not decode) a batch past N
        for images, _ in itertools.islice(batches, num_batches):
            with autocast(dist.device.type, autocast_dtype):
                model(images)
            used += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if used == 0:
        raise RuntimeError("BN recalibration got no batches: the training split is empty")
    if dist.initialized:
        # equal weights: train loaders yield the same number of batches on every rank
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce_sum_(buf)
                    buf.div_(dist.world_size)
    return used
