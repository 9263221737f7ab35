"""The training loss, ONE implementation for both engines (engine/ddp.py, engine/deepspeed.py).

    criterion = Criterion.from_config(cfg, autocast_dtype, teacher)   # teacher: distill.py
    loss, parts = criterion(model, images, targets)                   # autocast fwd + loss

The loss (``training_loss``, pure, on logits)::

    CE   = cross_entropy(student, targets, label_smoothing=train.label_smoothing)
    KD   = T^2 * KL(softmax(teacher / T) || softmax(student / T))           (batch mean)
    loss = CE                                     without a teacher
         = (1 - distill.weight) * CE + distill.weight * KD                   with one
         + CE(teacher, targets)                        distill.co_train (the teacher learns too)

``targets`` are class indices (B,) int64 or, after mixup/cutmix (:class:`BatchMixer`), soft targets
(B, C) float rows summing to 1; label smoothing applies to both the same way (torch's
``cross_entropy``: ``(1 - eps) * target + eps / C``), and since that is linear in the target,
smoothing a mixed target equals mixing smoothed targets (timm's ``mixup_target`` order).
The T^2 factor keeps the KD gradient's scale independent of T (Hinton et al. 2015, §2).

Logits are upcast to fp32 (``metrics.upcast_logits``) before the loss, whatever the autocast dtype:
the log-softmax of 1000 bf16 logits loses ~3 significant digits of the loss. (The two engines used
to differ here: DDP upcast only 16-bit logits, DeepSpeed called ``.float()``; same values for
bf16/fp16/fp32 logits, one spelling now.)

Mixup / cutmix run batch-level on the device after loading (:class:`BatchMixer`, called by the
trainer on each per-rank batch before ``forward_backward``), so they work the same for the
torchvision and the DALI loaders. Their randomness (lambda, permutation, box) comes from torch's
global CPU generator, which the checkpoint's per-rank RNG state restores: a resumed run mixes the
same way as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.device_policy import autocast
from addernet_dist.metrics import upcast_logits

if TYPE_CHECKING:
    from addernet_dist.config import Config, TrainConfig


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch (fp32)."""
    t = temperature
    log_p_s = F.log_softmax(upcast_logits(student) / t, dim=1)
    log_p_t = F.log_softmax(upcast_logits(teacher).detach() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)


def training_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {"ce", "kd"} detached terms; {} without a teacher). See the module docstring."""
    ce = F.cross_entropy(upcast_logits(logits), targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce, {}
    kd = kd_loss(logits, teacher_logits, temperature)
    loss = (1.0 - kd_weight) * ce + kd_weight * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


class Criterion:
    """Forward pass + loss of one (micro-)batch, as both engines run it.

    ``teacher`` (optional): a frozen model (distill.build_teacher: eval mode, no grad, not in the
    optimizer, not wrapped by DDP/DeepSpeed) run on the same images under the same autocast.
    """

    def __init__(
        self,
        autocast_dtype: torch.dtype | None,
        *,
        label_smoothing: float = 0.0,
        teacher: nn.Module | None = None,
        kd_weight: float = 0.0,
        temperature: float = 1.0,
        co_train: bool = False,
    ) -> None:
        self.autocast_dtype = autocast_dtype
        self.co_train = co_train
        self.label_smoothing = label_smoothing
        self.teacher = teacher
        self.kd_weight = kd_weight
        self.temperature = temperature

    @classmethod
    def from_config(
        cls, cfg: Config, autocast_dtype: torch.dtype | None, teacher: nn.Module | None = None
    ) -> Criterion:
        return cls(
            autocast_dtype,
            label_smoothing=cfg.train.label_smoothing,
            teacher=teacher,
            kd_weight=cfg.distill.weight,
            temperature=cfg.distill.temperature,
            co_train=cfg.distill.co_train,
        )

    def __call__(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_logits = None
        with autocast(images.device.type, self.autocast_dtype):
            logits = model(images)
            if self.teacher is not None and self.co_train:
                teacher_logits = self.teacher(images.float())
            elif self.teacher is not None:
                if self.teacher.training:  # engine.train() only ever touches the student
                    raise RuntimeError("the frozen distillation teacher must stay in eval mode")
                with torch.no_grad():
                    # fp32 teacher: DeepSpeed's bf16 precision hands the student bf16 images
                    teacher_logits = self.teacher(images.float())
        loss, parts = training_loss(
            logits,
            targets,
            teacher_logits,
            label_smoothing=self.label_smoothing,
            kd_weight=self.kd_weight,
            temperature=self.temperature,
        )
        if self.co_train and teacher_logits is not None:
            # The teacher learns on the labels; kd_loss detached its logits, so the two gradients
            # stay apart and one backward of the sum trains both (PKKD's progressive setting).
            teacher_ce = F.cross_entropy(
                upcast_logits(teacher_logits), targets, label_smoothing=self.label_smoothing
            )
            loss = loss + teacher_ce
            parts["teacher_ce"] = teacher_ce.detach()
        return loss, parts


# ---------------------------------------------------------------------------------------------
# Mixup / cutmix (batch level, on the device)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: partner permutation, lambda, and for cutmix the box (y0, y1, x0, x1)."""

    perm: torch.Tensor
    lam: float
    box: tuple[int, int, int, int] | None = None


def mix_batch(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, draw: MixDraw
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets (B, C) fp32) for a given draw.

    mixup:  x = lam * x + (1 - lam) * x[perm],  y = lam * onehot(y) + (1 - lam) * onehot(y[perm])
    cutmix: x = x with box taken from x[perm],  same y with lam = 1 - box area / image area.
    """
    perm = draw.perm.to(images.device)
    onehot = F.one_hot(labels, num_classes).float()
    lam = draw.lam
    if draw.box is None:
        mixed = images * lam + images[perm] * (1.0 - lam)
    else:
        y0, y1, x0, x1 = draw.box
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[-2] * images.shape[-1])
    if images.is_contiguous(memory_format=torch.channels_last):
        mixed = mixed.contiguous(memory_format=torch.channels_last)
    return mixed, onehot * lam + onehot[perm] * (1.0 - lam)


def cutmix_box(lam: float, height: int, width: int, gen: torch.Generator | None = None):
    """timm's ``rand_bbox``: a box of area ~(1 - lam) of the image around a uniform centre, clipped."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (), generator=gen))
    cx = int(torch.randint(width, (), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y0, y1, x0, x1


class BatchMixer:
    """``train.mixup_alpha`` / ``train.cutmix_alpha`` / ``train.mixup_prob`` /
    ``train.mixup_switch_prob`` (timm's ``Mixup`` in "batch" mode, with a random partner
    permutation instead of timm's batch flip): each batch is mixed with probability mixup_prob;
    with both alphas > 0, cutmix is chosen with probability mixup_switch_prob, else mixup;
    lambda ~ Beta(alpha, alpha). Off (both alphas 0): batches pass through unchanged."""

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
    ) -> None:
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob

    @classmethod
    def from_config(cls, train_cfg: TrainConfig, num_classes: int) -> BatchMixer:
        return cls(
            num_classes,
            train_cfg.mixup_alpha,
            train_cfg.cutmix_alpha,
            train_cfg.mixup_prob,
            train_cfg.mixup_switch_prob,
        )

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, batch: int, height: int, width: int) -> MixDraw | None:
        """The random part (torch's global CPU generator; restored on resume)."""
        if not self.enabled or float(torch.rand(())) >= self.prob:
            return None
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or float(torch.rand(())) < self.switch_prob
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(batch)
        box = cutmix_box(lam, height, width) if use_cutmix else None
        return MixDraw(perm, lam, box)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        draw = self.draw(images.shape[0], images.shape[-2], images.shape[-1])
        if draw is None:
            return images, labels  # class indices: the same loss as their one-hot rows
        return mix_batch(images, labels, self.num_classes, draw)
