"""Typed, validated run configuration: YAML file + dotted command-line overrides.

    cfg = load_config("configs/debug.yaml", ["optim.lr=0.05", "output_dir=runs/x", "resume=none"])

Every section forbids unknown keys; a validation problem raises :class:`ConfigError` whose message
names the offending key (``train.epochs: Input should be a valid integer (got 'ten')``) and, for an
unknown key, lists the valid ones. The resolved config is written to ``<output_dir>/config.yaml``
by the trainer only after everything (config, data folders) has been validated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from addernet_dist.data.config import DataConfig
from addernet_dist.engine.deepspeed_config import DeepSpeedConfig


class ConfigError(ValueError):
    """A user-facing configuration problem (bad key, bad value, missing file)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "resnet8"
    conv: Literal["adder", "conv"] = "adder"
    # None: take the class count from the dataset (loader.num_classes).
    num_classes: int | None = Field(default=None, ge=1)
    # Classifier of the ResNets: "linear" (torchvision's), or "linear_bn", the official AdderNet
    # ResNets' linear (1x1 conv) + BatchNorm over the logits (models/resnet.py), which the imported
    # huawei-noah checkpoints need (configs/official_*.yaml).
    head: Literal["linear", "linear_bn"] = "linear"
    head_bias: bool = True  # the official ResNet-20 classifier has none, ResNet-50's has one
    # Extra constructor keyword arguments for create_model (model specific).
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _head_on_resnets(self) -> ModelConfig:
        if (self.head != "linear" or not self.head_bias) and not self.name.startswith("resnet"):
            raise ValueError(
                f"model.head / model.head_bias are options of the ResNets (resnet8/20/32/18/50); "
                f"model {self.name!r} has its own classifier: leave them at linear / true"
            )
        return self

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for create_model besides name/conv/num_classes. The head options are
        passed only when not the default, so models without them (LeNet, VGG) build unchanged."""
        kw = dict(self.kwargs)
        if self.head != "linear" or not self.head_bias:
            kw.update(head=self.head, head_bias=self.head_bias)
        return kw


class OptimConfig(_Section):
    # SGD with Nesterov momentum (NAG) is what the paper uses everywhere (§5.2-5.4).
    name: Literal["sgd"] = "sgd"
    lr: float = Field(default=0.1, gt=0)  # for the GLOBAL batch; no automatic scaling
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    warmup_start_factor: float = Field(default=0.1, gt=0, le=1)
    min_lr: float = Field(default=0.0, ge=0)  # cosine floor
    poly_power: float = Field(default=1.0, gt=0)


class AdderConfig(_Section):
    # l2 -> l1 training (§4.2, Table 4 ablation "lp->l1"): p decays linearly per iteration from
    # p_start to p_end over p_decay_epochs, then stays at p_end. Off: p = p_end throughout.
    p_schedule: bool = True
    p_start: float = Field(default=2.0, ge=1)
    p_end: float = Field(default=1.0, ge=1)
    p_decay_epochs: float | None = Field(default=None, ge=0)  # None: 3/4 of train.epochs (Table 6)
    # Adaptive learning-rate scaling, eq. 33 (Table 4 ablation "adaptive LR").
    adaptive_lr: bool = True
    eta: float = Field(default=0.1, gt=0)
    # "global": alpha_l from the all-reduced (global-batch) gradient, independent of world size.
    # "local": the original code's per-rank normalisation before the all-reduce (for comparison).
    adaptive_scope: Literal["global", "local"] = "global"
    # Full-precision filter gradient X - F (eq. 23); off = sign gradient (eq. 22, Table 4 ablation).
    full_precision_grad: bool = True
    grad_x: Literal["lp", "hardtanh"] = "lp"
    # Operator backend (addernet_dist.ops.dispatch): auto = triton on CUDA, cpu on CPU; the
    # ADDERNET_BACKEND environment variable applies when this is auto. triton on a CPU device runs
    # the kernels in Triton's interpreter and needs TRITON_INTERPRET=1 (else a config error).
    backend: Literal["auto", "reference", "cpu", "triton"] = "auto"
    # Adder2d → BatchNorm2d (→ ReLU, + residual) pairs as one FusedAdderBN2d (models/fusion.py): BN's
    # batch statistics come from the forward kernel's epilogue instead of a re-read of the output.
    # "auto": on CUDA with the triton backend (elsewhere the fused module runs the unfused pair anyway).
    # Checkpoints keep the unfused keys either way.
    fuse_bn: bool | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _p_order(self) -> AdderConfig:
        if self.p_end > self.p_start:
            raise ValueError(f"adder.p_end={self.p_end} must be <= adder.p_start={self.p_start}")
        return self


class TrainConfig(_Section):
    epochs: int = Field(default=1, ge=1)
    global_batch_size: int = Field(default=256, ge=1)  # split evenly over WORLD_SIZE ranks
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast of every forward pass (training, evaluation, BN recalibration), on CPU too; the
    # adder layers compute and return fp32 under it (addernet_dist/ops/amp.py). CUDA needs sm_80+.
    bf16: bool = True
    channels_last: bool = False
    grad_clip: float | None = Field(default=None, gt=0)  # max total grad norm; None: off
    compile: bool = False
    seed: int = 0
    log_every: int = Field(default=10, ge=1)  # steps; also the cadence of adder grad-norm logs
    ckpt_every_steps: int = Field(default=0, ge=0)  # 0: only at the end of each epoch
    eval_every_epochs: int = Field(default=1, ge=1)  # the last epoch is always evaluated
    # Before an evaluation at p > 1 (the lp -> l1 decay), recompute BN running statistics from this
    # many training batches per rank at the current p (metrics.recalibrate_bn: the momentum-0.1
    # statistics lag a moving p). 0: off. (best.pt only ever comes from evaluations at the final p.)
    bn_recalibration_batches: int = Field(default=0, ge=0)
    # Retention: the newest keep_last step checkpoints that verify are kept; older ones are deleted
    # only once verified (checkpoint.Checkpointer.prune); unreadable ones are moved to *.corrupt.
    keep_last: int = Field(default=3, ge=1)
    # Divergence: the run stops with an error (exit 1, no checkpoint of the non-finite model) once
    # the loss or a gradient norm has been NaN/inf for this many consecutive steps. Checked on log
    # steps and before every checkpoint/evaluation (a host sync there anyway), so a NaN costs at
    # most log_every steps of compute; a model with a non-finite weight is never saved.
    max_nonfinite_steps: int = Field(default=3, ge=1)
    # Stalled ranks (multi-process only): when a rank's training loop makes no progress for this
    # long, it names the ranks that stopped responding (and their step) and exits 1, so torchrun
    # --max-restarts restarts the group from the last checkpoint instead of waiting for the 30-min
    # process-group timeout. 0: off. Steady state: a debug step takes ~0.1 s, an ImageNet
    # ResNet-50 step ~0.5 s, so 300 s is >500 missed steps.
    stall_timeout_s: float = Field(default=300.0, ge=0)
    # The longer limit for the first stall_startup_steps steps (torch.compile, Triton autotuning,
    # NCCL warm-up), evaluations and checkpoint writes (minutes on ImageNet).
    stall_timeout_startup_s: float = Field(default=1800.0, ge=0)
    stall_startup_steps: int = Field(default=20, ge=0)
    # Start from these weights (a checkpoint file of ours, one written by addernet-import-official,
    # or an addernet-export .safetensors), not from a training state: no optimizer, step, LR or p
    # schedule state is taken. Every key must match the model (interop.load_weights_into); a resume
    # from output_dir takes precedence (the run already started from these weights).
    init_from: str | None = None
    # fnmatch patterns of state_dict keys kept from the fresh model instead (e.g. ["fc.*"] for a new
    # classifier when fine-tuning to another number of classes). Each must match some key.
    init_from_ignore: list[str] = Field(default_factory=list)
    # tqdm bar: true / false / auto (only on an interactive terminal; plain log lines otherwise).
    # bool rather than "on"/"off": YAML reads a bare on/off as a boolean.
    progress_bar: bool | Literal["auto"] = "auto"
    # Also recalibrate (train.bn_recalibration_batches batches) before evaluations at the final p:
    # on short runs the momentum-0.1 running statistics still lag the weights at the end (one
    # checkpoint: 10% top-1 with them, 56% with batch statistics). The eval record says
    # "bn_recalibration_final": true, and best.pt / the checkpoints hold the recalibrated statistics.
    bn_recalibration_final: bool = False
    # Exponential moving average of the weights and BN buffers, updated after every optimizer step
    # (addernet_dist/ema.py): evaluated next to the model at the same p (ema_* fields of the eval
    # record), kept in the checkpoint, its best at the final p copied to checkpoints/best_ema.pt
    # (addernet-eval --ema). None: off. Averages over ~1/(1 - decay) steps: 0.9999 ~ 10k steps.
    ema_decay: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _recalibration_final_needs_batches(self) -> TrainConfig:
        if self.bn_recalibration_final and not self.bn_recalibration_batches:
            raise ValueError(
                "train.bn_recalibration_final=true needs train.bn_recalibration_batches > 0 (the "
                "number of training batches per rank to recalibrate from), e.g. 20"
            )
        return self

    @field_validator("init_from_ignore", mode="before")
    @classmethod
    def _one_pattern(cls, v: Any) -> Any:
        # train.init_from_ignore=fc.* on the command line is one string, not a list
        return [v] if isinstance(v, str) else v


class WandbConfig(_Section):
    enabled: bool = False
    project: str = "addernet-dist"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    # auto: online when WANDB_API_KEY is set, else offline (sync later with `wandb sync`).
    mode: Literal["auto", "online", "offline"] = "auto"


# The ``deepspeed:`` section lives with the DeepSpeed engine (engine/deepspeed_config.py; it
# imports no deepspeed, so loading a config stays fast).
DeepSpeedSection = DeepSpeedConfig


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    adder: AdderConfig = Field(default_factory=AdderConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    engine: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    output_dir: str = "runs/default"
    # auto: newest valid checkpoint in output_dir if any (none valid: start from scratch, said);
    # none: start fresh (refused in a folder that already holds a run, see overwrite); else a path.
    resume: str = "auto"
    # With resume=none (or a resume path from another folder) in an output_dir that holds a run:
    # move that run's checkpoints/, metrics.jsonl and config.yaml into output_dir/old-<UTC time>/
    # first. false (default): such a start is refused; two runs never share one folder.
    overwrite: bool = False

    def p_decay_epochs(self) -> float:
        if self.adder.p_decay_epochs is not None:
            return self.adder.p_decay_epochs
        return 0.75 * self.train.epochs  # Table 6: 600 of 800 epochs

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, error messages
# ---------------------------------------------------------------------------------------------


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (None if not a model)."""
    model: Any = Config
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = _section_model(loc[:-1])
            valid = sorted(parent.model_fields) if parent is not None else []
            where = ".".join(str(p) for p in loc[:-1]) or "top level"
            lines.append(f"unknown key '{key}'; valid keys in {where}: {', '.join(valid)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key}: {e['msg']}{got_s}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        # YAML scalars: 0.05 -> float, true -> bool, [a, b] -> list, null -> None, else string.
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key.sub=value`` items in a nested dict (returns a new dict)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(path[: i + 1])
                raise ConfigError(
                    f"override {item!r}: '{prefix}' is a value ({child!r}), not a section"
                )
            node = child
        node[path[-1]] = value
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file '{p}' does not exist; pass --config configs/<name>.yaml"
            )
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return config_from_dict(apply_overrides(raw, overrides or []))


def save_resolved(cfg: Config, output_dir: str | os.PathLike) -> Path:
    """Atomically write ``config.yaml`` into ``output_dir`` (never leaves a half-written file)."""
    from addernet_dist.runfolder import atomic_write_text

    dst = Path(output_dir) / "config.yaml"
    atomic_write_text(cfg.to_yaml(), dst)
    return dst
