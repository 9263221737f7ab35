"""Exponential moving average of the weights and BN buffers (``train.ema_decay``), a trainer component.

After every optimizer step ``ema = decay * ema + (1 - decay) * model`` for every parameter and
floating-point buffer (BN running mean/var), starting from the model at step 0; integer buffers
(BN ``num_batches_tracked``) are copied. After n steps from weights w_0..w_n:
``ema_n = decay^n w_0 + (1 - decay) * sum_{i=1..n} decay^(n-i) w_i`` (tests/integration/test_ema.py checks it).

The EMA is a module of its own (a copy of the bare model, fp32, no gradients), so it is evaluated
exactly like the model: the trainer sets its p to the model's before every evaluation (the ℓp
schedule: an EMA evaluated at another p computes another distance), the evaluator recalibrates its
BN statistics under the same rule as the model's, and its state dict keeps the model's keys.

Distributed (decided, docs/training.md "Recipes"): the EMA lives on EVERY rank. Its parameters are
identical everywhere (every rank steps the same all-reduced gradient); its BN buffers follow each
rank's own running statistics, as the model's do between DDP's buffer broadcasts, so before every
evaluation the ranks take rank 0's (the evaluator broadcasts them, or recalibrates and averages),
and the checkpoint holds rank 0's (rank 0 writes it). DeepSpeed: ZeRO-0/1/2 keep full parameters
on every rank (only optimizer state and gradients are partitioned), so the same code applies;
ZeRO-3, which partitions the parameters themselves, is refused by the config already (engine/deepspeed_config.py) and
:class:`ModelEMA` refuses a model whose parameters are partitioned (``ds_numel`` attributes) with a
clear error. Under ``deepspeed.precision=bf16`` the EMA stays fp32 (a bf16 average of weights that
move by ~1e-3 of their size per step would round every update away).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """The EMA of ``model`` (the bare model, on its device) with ``decay`` in (0, 1)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1), e.g. 0.9999")
        partitioned = [n for n, p in model.named_parameters() if hasattr(p, "ds_numel")]
        if partitioned:
            raise ValueError(
                f"train.ema_decay: the parameters are partitioned (DeepSpeed ZeRO-3: {partitioned[0]}, "
                "...); an EMA needs the full weights on every rank: use deepspeed.zero_stage <= 2 or "
                "drop train.ema_decay"
            )
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval()
        self.module.requires_grad_(False)
        # The tensors paired once (in state_dict order): optimizers, BN and load_state_dict update
        # them in place, and walking both state dicts every step cost 4.5 ms of Python on ResNet-50
        # (372 entries; the 2-core dev box, busy).
        self._pairs = self._pair(model)

    def _pair(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list, list]:
        """(EMA floats, model floats, EMA others, model others)."""
        mine = self.module.state_dict(keep_vars=True)
        theirs = model.state_dict(keep_vars=True)
        if mine.keys() != theirs.keys():
            raise ValueError("the EMA's keys differ from the model's (was the model rebuilt?)")
        ef, mf, eo, mo = [], [], [], []
        for k, e in mine.items():
            if not isinstance(e, torch.Tensor):
                continue  # an adder layer's extra state (p, gradient modes): set by the trainer
            if e.is_floating_point():
                ef.append(e)
                mf.append(theirs[k])
            else:
                eo.append(e)
                mo.append(theirs[k])
        return ef, mf, eo, mo

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step (device ops only: no host sync)."""
        ef, mf, eo, mo = self._pairs
        mf = [m if m.dtype == e.dtype else m.to(e.dtype) for e, m in zip(ef, mf)]
        torch._foreach_lerp_(ef, mf, 1.0 - self.decay)  # e += (1 - decay) * (m - e)
        for e, m in zip(eo, mo):
            e.copy_(m)

    @torch.no_grad()
    def start_fresh(self) -> None:
        """The EMA restarts from the model's current weights (a resume from a checkpoint without
        one: the model holds the resumed weights, this EMA a copy of the fresh init)."""
        ef, mf, eo, mo = self._pairs
        torch._foreach_copy_(ef + eo, mf + mo)

    # ---- Stateful (the checkpoint's "ema") ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a run resumed with another train.ema_decay continues the stored average with the new decay
        self.module.load_state_dict(state["model"])
