"""Evaluation inside a training run: BN recalibration at a moving p, top-1/top-5, the best-at-final-p rule.

The :class:`Evaluator` is one of the trainer's checkpointed components: its state is the last evaluation
(the checkpoint's ``last_eval``), which a run resumed after its final evaluation reports again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from addernet_dist.data.base import Loader
from addernet_dist.distributed import DistInfo
from addernet_dist.metrics import EvalResult, evaluate, recalibrate_bn

# BN recalibration shuffles the training split with this offset on train.seed, an order no training
# epoch uses, so the training loader's position (and with it mid-epoch resume) is untouched.
RECALIBRATION_SEED_OFFSET = 7_919


class BNRecalibrator:
    """BN statistics at the current p from training batches (``train.bn_recalibration_batches``).

    Its loader is built once, on first use, and reused with ``set_epoch``: building one is a scan
    of the training tree (1.28M files on ImageNet) that used to be repeated at every evaluation.
    The batches are those of a fresh loader: every call starts epoch ``e`` at batch 0 (``set_epoch``
    to another epoch and back: ``set_epoch(e)`` alone keeps a position inside ``e``), so the EMA's
    recalibration after the model's, in the same epoch, reads the same batches.
    """

    def __init__(self, num_batches: int, build_loader: Callable[[], Loader]) -> None:
        self.num_batches = num_batches
        self._build_loader = build_loader
        self._loader: Loader | None = None

    @property
    def loader(self) -> Loader:
        if self._loader is None:
            self._loader = self._build_loader()
        return self._loader

    def __call__(
        self, model: nn.Module, dist: DistInfo, epoch: int, autocast_dtype: torch.dtype | None
    ) -> int:
        """Collective. Recalibrate ``model``'s BN statistics; returns the batches used per rank."""
        loader = self.loader
        # batch 0 of ``epoch`` even when a recalibration in this epoch read some already (the EMA's
        # follows the model's): set_epoch is a no-op within an epoch, so step out of it first
        loader.set_epoch(epoch + 1)
        loader.set_epoch(epoch)
        n = min(self.num_batches, len(loader))
        return recalibrate_bn(model, loader, dist, num_batches=n, autocast_dtype=autocast_dtype)


class Evaluator:
    """Owns evaluation during training: BN recalibration while p is above 1, evaluation on the
    val split, and which evaluations may become ``best.pt``.

    ``final_p``: the p the run ends with, or None for a model without adder layers (no p: every
    evaluation is a best candidate and BN is never recalibrated).
    ``recalibrate_final``: recalibrate before evaluations at the final p too
    (``train.bn_recalibration_final``; the extra record fields say so).
    """

    def __init__(
        self,
        val_loader: Loader,
        dist: DistInfo,
        recalibrate: BNRecalibrator,
        *,
        final_p: float | None,
        autocast_dtype: torch.dtype | None,
        recalibrate_final: bool = False,
    ) -> None:
        self.val_loader = val_loader
        self.dist = dist
        self.recalibrate = recalibrate
        self.final_p = final_p
        self.autocast_dtype = autocast_dtype
        self.recalibrate_final = recalibrate_final
        self.last_eval: dict[str, float] | None = None  # checkpointed: the last evaluation

    # ---- Stateful (the checkpoint's "last_eval") ----------------------------------------------
    def state_dict(self) -> dict[str, float] | None:
        return self.last_eval

    def load_state_dict(self, state: dict[str, float] | None) -> None:
        self.last_eval = state

    def last_result(self) -> EvalResult | None:
        """The last evaluation (restored ones included), as an :class:`EvalResult`."""
        if self.last_eval is None:
            return None
        return EvalResult(**{k.removeprefix("val/"): v for k, v in self.last_eval.items()})

    # ---- evaluation ---------------------------------------------------------------------------
    def __call__(
        self, model: nn.Module, epoch: int, p: float | None
    ) -> tuple[EvalResult, dict[str, Any]]:
        """Collective. Evaluate ``model`` (whose adder layers compute at ``p``); returns the result
        and the extra fields of its metrics record (the recalibration, when one ran). The result is
        the evaluation the checkpoint keeps as ``last_eval``."""
        result, extra = self.evaluate(model, epoch, p)
        self.last_eval = result.as_dict()
        return result, extra

    def evaluate(self, model: nn.Module, epoch: int, p: float | None) -> tuple[EvalResult, dict[str, Any]]:
        """Collective. :meth:`__call__` without recording it as the last evaluation (the EMA's)."""
        recal = 0
        at_final = self.best_candidate(p)
        if self.wants_recalibration(p):
            recal = self.recalibrate(model, self.dist, epoch, self.autocast_dtype)
        else:
            # Ranks' BN running stats drift apart after the last forward (each saw its own
            # batch); evaluate everywhere with rank 0's, which is also what gets checkpointed.
            self.dist.broadcast_buffers_(model)
        result = evaluate(model, self.val_loader, self.dist, autocast_dtype=self.autocast_dtype)
        extra: dict[str, Any] = {}
        if recal:
            extra = {"bn_recalibration_batches": recal, "p": p}
            if at_final:
                extra["bn_recalibration_final"] = True
        return result, extra

    def wants_recalibration(self, p: float | None) -> bool:
        """BN recalibration before an evaluation at ``p``: while p is above 1 (the decay), and at
        the final p too with ``recalibrate_final``; never for a model without adder layers."""
        if p is None or self.final_p is None or not self.recalibrate.num_batches:
            return False
        return p > 1.0 or (self.recalibrate_final and self.best_candidate(p))

    def best_candidate(self, p: float | None) -> bool:
        """best.pt holds a model at the p the run ends with (p_end, unless the run stops before the
        decay does): a recalibrated mid-decay evaluation can score well, but that model computes
        another l_p distance than the AdderNet the run produces."""
        return self.final_p is None or abs(p - self.final_p) < 1e-9

    def is_new_best(self, result: EvalResult, p: float | None, state: Any) -> bool:
        """Whether ``result`` becomes best.pt. A new best is recorded in the train state
        (``best_top1``: the maximum over the candidates; ``best_step``: the step whose checkpoint
        becomes best.pt) before the checkpoint that carries it is written: a run stopped while
        copying it to best.pt copies it again on resume (Checkpointer.restore_best)."""
        if not self.best_candidate(p) or not result.top1 > state.best_top1:
            return False
        state.best_top1, state.best_step = result.top1, state.global_step
        return True
