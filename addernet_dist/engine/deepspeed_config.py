"""The ``deepspeed:`` config section and its translation into a DeepSpeed JSON config.

Everything that decides the training ALGORITHM stays in our own sections, so ``engine: ddp`` and
``engine: deepspeed`` run the same algorithm from the same YAML: the optimizer (``optim``), LR and
lp schedules, eq. 33 (``adder``), clipping (``train.grad_clip``), the global batch
(``train.global_batch_size``) and autocast (``train.precision``). This section only says HOW
DeepSpeed shards and batches it. The DeepSpeed keys that would silently change the algorithm
(``optimizer``, ``scheduler``, ``gradient_clipping``, ``fp16``, batch sizes, ...) are generated
here and refused in ``overrides`` with a message naming the key to use instead.

    engine: deepspeed
    deepspeed:
      zero_stage: 2               # 0, 1 or 2 (3: clear error, see below)
      micro_batch_size: 32        # per rank and forward; default: global batch / world size
      precision: autocast         # autocast (as DDP) | bf16 (DeepSpeed bf16 weights, ZeRO-1/2)
      config_file: ds.json        # optional DeepSpeed JSON, merged before `overrides`
      overrides: {zero_optimization: {reduce_bucket_size: 50000000}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# DeepSpeed keys this engine generates from our own sections: overriding them would make the
# DeepSpeed run differ from the DDP run of the same YAML. Value: what to set instead.
_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "deepspeed.micro_batch_size",
    "gradient_accumulation_steps": "deepspeed.gradient_accumulation_steps",
    "gradient_clipping": "train.grad_clip (applied after eq. 33, as in the DDP engine)",
    "optimizer": "the optim section (the engine passes its torch SGD to DeepSpeed)",
    "scheduler": "the optim section (LR schedule stepped per iteration by the engine)",
    "fp16": "deepspeed.precision (fp16 is not supported under DeepSpeed: train.precision=fp16 is DDP only)",
    "bf16": "deepspeed.precision=bf16",
    "torch_autocast": "train.precision with deepspeed.precision=autocast",
    "zero_allow_untested_optimizer": "nothing (always on: the optimizer is torch SGD)",
    "amp": "train.precision",
}

# The other top-level DeepSpeed keys we pass through (anything else is a typo or a feature this
# engine does not support, e.g. pipeline or MoE settings).
_PASSTHROUGH_KEYS = {
    "zero_optimization",
    "steps_per_print",
    "wall_clock_breakdown",
    "memory_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "dump_state",
    "checkpoint",
    "data_types",
    "flops_profiler",
    "comms_logger",
    "timers",
    "tensorboard",
    "csv_monitor",
}

# zero_optimization keys that change which code path holds the gradients; the eq. 33 hook is
# tested on the default (on-device) path only.
_REFUSED_ZERO_KEYS = {
    "stage": "deepspeed.zero_stage",
    "offload_optimizer": None,
    "offload_param": None,
    "cpu_offload": None,
}


class DeepSpeedConfig(BaseModel):
    """``deepspeed:`` section (only read when ``engine: deepspeed``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # 0: replicated (DDP-like), 1: optimizer state sharded, 2: + gradients sharded.
    # 3 shards the parameters themselves; see _stage3 below for why it is refused.
    zero_stage: Literal[0, 1, 2, 3] = 0
    # Samples per rank per forward. None: train.global_batch_size / world size (no accumulation).
    micro_batch_size: int | None = Field(default=None, ge=1)
    # None: derived as global / (micro * world). Set both to have them checked against each other.
    gradient_accumulation_steps: int | None = Field(default=None, ge=1)
    # autocast: fp32 weights, torch.autocast(bf16) when train.precision=bf16 (what DDP does).
    # bf16: DeepSpeed's bf16 weights/grads with an fp32 master copy (less memory, different
    #       rounding than DDP; ZeRO-1/2 only because eq. 33 needs the fp32 partition mapping).
    precision: Literal["autocast", "bf16"] = "autocast"
    # A DeepSpeed JSON file merged into the generated config (then `overrides` on top).
    config_file: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("zero_stage")
    @classmethod
    def _stage3(cls, v: int) -> int:
        if v == 3:
            raise ValueError(
                "ZeRO stage 3 is not supported by the DeepSpeed engine: it partitions the adder "
                "weights themselves, so the adder operator would run on gathered copies outside "
                "DeepSpeed's hooks and eq. 33 would need per-layer norms of partitioned grads "
                "that stage 3 never materialises as one flat buffer. Use zero_stage 2 (grads and "
                "optimizer state sharded)"
            )
        return v

    @model_validator(mode="after")
    def _check_ds_keys(self) -> DeepSpeedConfig:
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError(
                "deepspeed.precision=bf16 needs zero_stage 1 or 2 (at stage 0 DeepSpeed's bf16 "
                "optimizer hides the fp32 master weights eq. 33 must scale); use "
                "precision=autocast (what the DDP engine does) or zero_stage 1"
            )
        merged = self.ds_overrides()
        for key, value in merged.items():
            where = f"deepspeed.overrides.{key}"
            if key in _OWNED_KEYS:
                raise ValueError(f"{where} is set by the engine; use {_OWNED_KEYS[key]} instead")
            if key not in _PASSTHROUGH_KEYS:
                raise ValueError(
                    f"unknown or unsupported DeepSpeed key {where}; supported keys: "
                    + ", ".join(sorted(_PASSTHROUGH_KEYS))
                )
            if key == "zero_optimization":
                _check_zero_section(value)
        return self

    def ds_overrides(self) -> dict[str, Any]:
        """config_file's keys, then ``overrides`` merged on top (nested dicts merged)."""
        base: dict[str, Any] = {}
        if self.config_file is not None:
            path = Path(self.config_file)
            if not path.is_file():
                raise ValueError(
                    f"deepspeed.config_file '{path}' does not exist; give a DeepSpeed JSON path"
                )
            try:
                base = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"deepspeed.config_file '{path}' is not valid JSON: {e}") from e
            if not isinstance(base, dict):
                raise ValueError(f"deepspeed.config_file '{path}' must hold a JSON object")
        return _merge(base, self.overrides)


def _check_zero_section(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError("deepspeed.overrides.zero_optimization must be a mapping")
    for key, instead in _REFUSED_ZERO_KEYS.items():
        if key in value:
            fix = f"use {instead}" if instead else "CPU/NVMe offload is not supported"
            raise ValueError(f"deepspeed.overrides.zero_optimization.{key}: {fix}")
    # DeepSpeed's own pydantic model forbids unknown keys and type-checks values; imported here
    # because importing deepspeed costs seconds and most configs never get this far.
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**value)
    except ValidationError as e:
        bad = "; ".join(
            f"zero_optimization.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"invalid deepspeed.overrides: {bad}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_batch(
    global_batch: int, world_size: int, micro: int | None, accum: int | None
) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) with ``micro * accum * world == global``.

    Raises ValueError naming the numbers and a fix when they do not divide.
    """
    if global_batch % world_size:
        raise ValueError(
            f"train.global_batch_size={global_batch} is not divisible by the world size "
            f"{world_size}; pick a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    if micro is None and accum is None:
        return per_rank, 1
    if micro is None:
        assert accum is not None
        if per_rank % accum:
            raise ValueError(
                f"deepspeed.gradient_accumulation_steps={accum} does not divide the per-rank "
                f"batch {per_rank} (train.global_batch_size={global_batch} / {world_size} ranks)"
            )
        return per_rank // accum, accum
    if per_rank % micro:
        raise ValueError(
            f"deepspeed.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
            f"(train.global_batch_size={global_batch} / {world_size} ranks); use a divisor of "
            f"{per_rank}"
        )
    derived = per_rank // micro
    if accum is not None and accum != derived:
        raise ValueError(
            f"deepspeed.micro_batch_size={micro} x gradient_accumulation_steps={accum} x "
            f"{world_size} ranks = {micro * accum * world_size} != train.global_batch_size="
            f"{global_batch}; set gradient_accumulation_steps={derived} or leave it out"
        )
    return micro, derived


def build_ds_config(
    section: DeepSpeedConfig,
    *,
    global_batch: int,
    world_size: int,
) -> dict[str, Any]:
    """The DeepSpeed JSON dict for ``deepspeed.initialize``.

    bf16 autocast (train.precision=bf16) is applied by the engine around the forward, exactly like
    the DDP engine, so DeepSpeed's own ``torch_autocast`` stays off: it would also switch the
    gradient all-reduce of every Linear/Conv to bf16, which DDP does not do.
    """
    micro, accum = resolve_batch(
        global_batch, world_size, section.micro_batch_size, section.gradient_accumulation_steps
    )
    extra = section.ds_overrides()
    zero = _merge({"stage": section.zero_stage}, extra.pop("zero_optimization", {}))
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # Clipping happens in zero_norms after eq. 33 (the DDP engine's order), never in DeepSpeed.
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # DeepSpeed prints progress every 10 steps by default; our trainer does the logging.
        "steps_per_print": 2**31 - 1,
    }
    if section.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        # DeepSpeed casts only parameters: BN running statistics stay fp32 buffers (a running mean
        # near -4000 cannot move in steps below bf16's 16-32 there). The engine makes BN compute
        # in fp32 with its bf16 weight and bias (engine/deepspeed.py, keep_batchnorm_fp32).
    return _merge(cfg, extra)
