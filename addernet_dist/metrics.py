"""Top-1 / top-5 accuracy and exact distributed evaluation.

Exactness: the eval loader hands every rank a shard in which padded duplicates carry label
``IGNORE_LABEL`` (-1). Each rank sums integer counts (correct@1, correct@5, valid samples) and the
summed loss; one all-reduce of those sums gives the result for the whole split, every sample
counted once. The counts are integers held in float64 (exact up to 2**53 samples), so top-1/top-5
with 2 ranks equal the 1-process values exactly on the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.data import IGNORE_LABEL
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

    autocast_dtype: e.g. torch.bfloat16 on CUDA; None evaluates in the model's dtype.
    """
    was_training = model.training
    model.eval()
    # [loss sum, correct@1, correct@5, valid count]; float64 keeps the integer counts exact.
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)
    for images, labels in loader:
        with torch.autocast(
            device_type=dist.device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
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
