"""Typed, validated run configuration: YAML file + dotted command-line overrides.

    cfg = load_config("configs/debug.yaml", ["optim.lr=0.05", "output_dir=runs/x", "resume=none"])

Every section forbids unknown keys; a validation problem raises :class:`ConfigError` whose message
names the offending key (``train.epochs: Input should be a valid integer (got 'ten')``) and, for an
unknown key, lists the valid ones. The resolved config is written to ``<output_dir>/config.yaml``
by the trainer only after everything (config, data folders) has been validated.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("addernet_dist")


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
    # sgd: SGD with Nesterov momentum (NAG), what the paper uses everywhere (§5.2-5.4), weight decay on
    # every parameter. adamw: torch AdamW (adam_betas, adam_eps), weight decay only on >= 2-d weights
    # (conv/adder/linear), not on BN parameters or biases; eq. 33 still applies (docs/training.md).
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0)  # for the GLOBAL batch; no automatic scaling
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    warmup_start_factor: float = Field(default=0.1, gt=0, le=1)
    min_lr: float = Field(default=0.0, ge=0)  # cosine floor
    poly_power: float = Field(default=1.0, gt=0)
    # AdamW's moment decay rates (beta1, beta2), torch's defaults; only for name=adamw.
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # AdamW's denominator epsilon (torch's default); only for name=adamw.
    adam_eps: float = Field(default=1e-8, gt=0)

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"optim.adam_betas must both be in [0, 1), got {list(v)}")
        return v


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
    # Deprecated alias of train.precision: true = bf16, false = fp32 (null after loading: the
    # resolved config shows train.precision). Setting both to different values is an error.
    bf16: bool | None = None
    # channels_last model and batches; the adder kernels stream NCHW, so for AdderNets it costs an x and dY
    # copy per adder layer (ResNet-50: 21.3 GB, ~4 % of a step); only plain-conv layers gain
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
    # Cross-entropy label smoothing eps (target (1 - eps) * y + eps / C; also in the CE term of
    # distillation, addernet_dist/loss.py). 0.1 is the usual ImageNet value (Szegedy et al. 2016).
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    # Batch-level mixup / cutmix on the device after loading (any loader, DALI included; loss.py
    # BatchMixer, timm's Mixup semantics): lambda ~ Beta(alpha, alpha); 0 turns each off.
    mixup_alpha: float = Field(default=0.0, ge=0)
    cutmix_alpha: float = Field(default=0.0, ge=0)
    mixup_prob: float = Field(default=1.0, ge=0, le=1)  # probability that a batch is mixed at all
    # With both alphas > 0: probability of cutmix (else mixup) for a mixed batch (timm: 0.5).
    mixup_switch_prob: float = Field(default=0.5, ge=0, le=1)
    # Autocast dtype of every forward pass (training, evaluation, BN recalibration), on CPU too; the
    # adder layers compute and return fp32 under it (addernet_dist/ops/amp.py). bf16 on CUDA needs
    # sm_80+; fp16 (V100-class GPUs) adds a GradScaler (DDP engine only; unscaled before eq. 33 and
    # clipping). null: from the deprecated train.bf16, else bf16.
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    # nn.BatchNorm2d -> SyncBatchNorm2d (sync_bn.py): BN batch statistics over the GLOBAL batch in
    # multi-process training (without it each rank normalises with its own B images). Needed for
    # "N ranks x B == 1 rank x N*B"; turns adder.fuse_bn=auto off (the fused epilogue is per rank).
    sync_bn: bool = False

    @model_validator(mode="after")
    def _precision_alias(self) -> TrainConfig:
        # Writes go through __dict__: validate_assignment would re-enter this validator.
        bf16, precision = self.bf16, self.precision
        if bf16 is not None:
            if "precision" in self.model_fields_set and precision is not None and (precision == "bf16") != bf16:
                raise ValueError(
                    f"train.bf16={str(bf16).lower()} (deprecated) contradicts train.precision={precision}; "
                    "remove train.bf16 and keep train.precision"
                )
            if precision is None:
                precision = "bf16" if bf16 else "fp32"
                log.warning("train.bf16 is deprecated: write train.precision=%s instead", precision)
        self.__dict__["precision"] = precision or "bf16"
        self.__dict__["bf16"] = None
        return self

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


class DistillConfig(_Section):
    # Knowledge distillation from a frozen CNN teacher (addernet_dist/distill.py, loss.py):
    # loss = (1 - weight) * CE(student, y) + weight * T^2 * KL(softmax(t/T) || softmax(s/T)).
    # teacher: a model name of our zoo, built with model.conv=conv (None: no distillation).
    teacher: str | None = None
    # Its weights: a checkpoint of ours (step_*.pt / best.pt), an addernet-export .safetensors
    # file, or a plain state dict file such as torchvision's resnet50 weights (read with
    # weights_only=True). Every key and shape must match the teacher model.
    teacher_checkpoint: str | None = None
    # Extra create_model keyword arguments of the teacher (as model.kwargs).
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)
    # PKKD's progressive setting: the CNN teacher is trained jointly, in the same step, on the labels
    # (its own CE, SGD with this run's optim section) while the student distils from its current
    # logits; teacher_checkpoint is then optional (initial weights). The teacher's model, optimizer
    # and LR schedule are part of the checkpoint. engine=ddp only.
    co_train: bool = False

    @model_validator(mode="after")
    def _teacher_and_weights(self) -> DistillConfig:
        if self.co_train and self.teacher is None:
            raise ValueError("distill.co_train=true needs distill.teacher (a model name, e.g. resnet8)")
        if not self.co_train and (self.teacher is None) != (self.teacher_checkpoint is None):
            raise ValueError(
                "distill.teacher and distill.teacher_checkpoint go together: set both (a teacher "
                "model name and its trained weights) or neither (no distillation); "
                "distill.co_train=true trains the teacher from scratch instead"
            )
        return self


class WandbConfig(_Section):
    enabled: bool = False
    project: str = "addernet-dist"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    # auto: online when WANDB_API_KEY is set, else offline (sync later with `wandb sync`).
    mode: Literal["auto", "online", "offline"] = "auto"


def _as_tuple(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, list | tuple) else value


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
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output_dir: str = "runs/default"
    # auto: newest valid checkpoint in output_dir if any (none valid: start from scratch, said);
    # none: start fresh (refused in a folder that already holds a run, see overwrite); else a path.
    resume: str = "auto"
    # With resume=none (or a resume path from another folder) in an output_dir that holds a run:
    # move that run's checkpoints/, metrics.jsonl and config.yaml into output_dir/old-<UTC time>/
    # first. false (default): such a start is refused; two runs never share one folder.
    overwrite: bool = False
    # A pretrained tag of the model zoo, "<model>.<tag>" (models/pretrained.py, e.g.
    # resnet20.official_cifar10): its input pipeline (data.image_size, val_resize_ratio, mean, std)
    # and classifier (model.head, head_bias) fill those keys where the config leaves them out; a key
    # set to another value is an error. Loads no weights (train.init_from does). None: no tag.
    pretrained: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _pretrained_values(cls, data: Any) -> Any:
        """``pretrained``: the zoo entry's values into the sections (configs/official_*.yaml carry no
        copy of the official normalisation, crop or head)."""
        if not isinstance(data, dict) or not data.get("pretrained"):
            return data
        from addernet_dist.models.pretrained import pretrained_cfg_by_name

        tag = pretrained_cfg_by_name(data["pretrained"])
        data = dict(data)
        for section, values in tag.config_values().items():
            given = data.get(section) or {}
            if isinstance(given, BaseModel):
                given = {k: getattr(given, k) for k in given.model_fields_set}
            merged = dict(given)
            for key, value in values.items():
                if key not in merged or merged[key] is None:
                    merged[key] = value
                elif _as_tuple(merged[key]) != _as_tuple(value):
                    raise ValueError(
                        f"{section}.{key}={merged[key]!r} differs from {value!r} of pretrained "
                        f"{data['pretrained']!r} (the weights' {section} setting, models/pretrained.py); "
                        f"drop {section}.{key} or the pretrained key"
                    )
            data[section] = merged
        return data

    @field_validator("output_dir")
    @classmethod
    def _output_dir_named(cls, v: str) -> str:
        # An empty value is Path("") = the current directory: the run would write its checkpoints,
        # metrics and config.yaml wherever it was launched from.
        if not v.strip():
            raise ValueError("output_dir is empty; name the run's folder, e.g. output_dir=runs/my_run")
        return v

    @model_validator(mode="after")
    def _recipe_combinations(self) -> Config:
        """Switches that cannot run together (docs/training.md, Recipes)."""
        train = self.train
        if train.precision == "fp16" and self.engine == "deepspeed":
            raise ValueError(
                "train.precision=fp16 is not supported with engine=deepspeed: DeepSpeed's fp16 mode "
                "(its 'fp16' section with its own loss scaler) calls module.half(), which also casts the "
                "BatchNorm running statistics to fp16 (a running mean near -4000 has a step of 2 there), "
                "and its loss scaler unscales inside DeepSpeed's step, not before eq. 33. Use engine=ddp "
                "with train.precision=fp16, or train.precision=bf16 (sm_80+) / fp32 with engine=deepspeed"
            )
        if train.precision == "fp16" and self.adder.adaptive_lr and self.adder.adaptive_scope == "local":
            raise ValueError(
                "adder.adaptive_scope=local normalises each rank's gradient inside backward, where "
                "train.precision=fp16 holds it multiplied by the loss scale (the unscale after it would "
                "divide the update by the scale); use adder.adaptive_scope=global or another precision"
            )
        if (
            self.engine == "deepspeed"
            and self.deepspeed.zero_stage in (1, 2)
            and self.optim.name == "adamw"
            and train.grad_clip is not None
        ):
            raise ValueError(
                "train.grad_clip with optim.name=adamw under deepspeed.zero_stage 1/2: ZeRO steps AdamW's "
                "two param groups (decay / no decay) one after the other, each with only its own gradient "
                "partition, so no global gradient norm exists at step time; use deepspeed.zero_stage=0, "
                "engine=ddp, or train.grad_clip=null"
            )
        if train.sync_bn and self.adder.fuse_bn is True:
            raise ValueError(
                "train.sync_bn=true with adder.fuse_bn=true: the fused Adder+BN kernel computes the BN "
                "statistics of this rank's batch in its epilogue, which cannot be synchronised; set "
                "adder.fuse_bn=auto (fusion then stays off) or false"
            )
        if train.precision == "fp16" and self.distill.co_train:
            raise ValueError(
                "distill.co_train=true with train.precision=fp16: the co-trained teacher steps its own "
                "optimizer on gradients the GradScaler multiplied by the loss scale (2^16) and never unscales "
                "them; use train.precision=bf16 or fp32 for co-training, or a frozen teacher "
                "(distill.co_train=false)"
            )
        return self

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
