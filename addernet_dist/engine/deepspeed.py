"""The DeepSpeed engine (``engine: deepspeed``): ZeRO-0/1/2 with the DDP engine's exact algorithm.

Same YAML, same algorithm as ``engine: ddp`` (engine/ddp.py): torch SGD-NAG from optim.py (DeepSpeed
gets the torch optimizer, not its own), the per-iteration LR schedule stepped here, eq. 33 on the
GLOBAL gradient, then clipping, then SGD's weight decay and momentum. What DeepSpeed adds is how
the state is split: ZeRO-1 shards optimizer state, ZeRO-2 also gradients (see deepspeed_config.py
for the section and engine/zero_norms.py for eq. 33 on sharded gradients).

One iteration (the Engine contract)::

    loss = engine.forward_backward(images, labels)  # per-rank batch, split into micro-batches
    stats = engine.step()                           # DeepSpeed boundary step -> our pre-hook:
                                                    # eq. 33 + clip on the (sharded) grads -> SGD

Launch (CPU: DS_ACCELERATOR=cpu, gloo; GPU: NCCL), see launch/deepspeed.sh and docs/deepspeed.md::

    torchrun --nproc_per_node=2 -m addernet_dist.train --config configs/debug.yaml engine=deepspeed
    deepspeed --num_gpus 8 -m addernet_dist.train --config configs/imagenet_resnet18.yaml \\
        engine=deepspeed deepspeed.zero_stage=2
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from addernet_dist import device_policy
from addernet_dist.adaptive_lr import AdaptiveLRScaler
from addernet_dist.checkpoint import CheckpointError
from addernet_dist.checkpoint.store import DEEPSPEED_FOLDER, CheckpointStore
from addernet_dist.config import ConfigError
from addernet_dist.engine import ds_checkpoint
from addernet_dist.engine.base import StepStats
from addernet_dist.engine.deepspeed_config import build_ds_config, resolve_batch
from addernet_dist.engine.prepare import PreparedEngine, PreparedModel
from addernet_dist.engine.zero_norms import ShardedGradProcessor
from addernet_dist.loss import Criterion
from addernet_dist.ops.amp import FP32BatchNorm2d, keep_batchnorm_fp32  # noqa: F401 (were defined here)

# Our part of DeepSpeed's client_state (DeepSpeed adds its own keys next to it).
_CLIENT_KEY = "addernet"


def _import_deepspeed(device: torch.device):
    # DeepSpeed picks its accelerator once, at import; on a CPU run it must be the CPU one even on
    # a machine that has CUDA (train.device=cpu). setdefault: an explicit user choice wins.
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    have = get_accelerator().device_name()
    if have != device.type:
        raise RuntimeError(
            f"DeepSpeed's accelerator is '{have}' but the run uses device '{device.type}'; set "
            f"DS_ACCELERATOR={device.type} (or train.device={have})"
        )
    return deepspeed


def _state_keys(model: nn.Module) -> dict[str, str]:
    """{named_parameters()/named_buffers() name: state_dict() key} where the two differ (fused
    Adder2d+BN modules save under the unfused keys)."""
    key_of = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: key_of[id(t)] for n, t in named if key_of.get(id(t), n) != n}


class DeepSpeedEngine(PreparedEngine):
    def _configure(self) -> bool:
        cfg, dist = self.cfg, self.dist
        if cfg.train.compile:
            raise ConfigError(
                "train.compile=true is not supported with engine=deepspeed; set train.compile=false"
            )
        if cfg.distill.co_train:
            raise ConfigError(
                "distill.co_train=true is implemented for engine=ddp only; use engine=ddp, or distil "
                "from a trained teacher (distill.co_train=false, distill.teacher_checkpoint=...)"
            )
        ds_section = cfg.deepspeed
        # Checked before DeepSpeed is even imported: a bad batch split is a config error.
        try:
            self.micro_batch, self.accum_steps = resolve_batch(
                cfg.train.global_batch_size,
                dist.world_size,
                ds_section.micro_batch_size,
                ds_section.gradient_accumulation_steps,
            )
            self._ds_config = build_ds_config(
                ds_section, global_batch=cfg.train.global_batch_size, world_size=dist.world_size
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._deepspeed = _import_deepspeed(self.device)
        self._ensure_process_group()
        # bf16 weights: prepare_model (engine/prepare.py) autocasts bf16 on any device (it then only
        # casts the fp32 images at the first layer) and keeps BN in fp32.
        bf16_weights = ds_section.precision == "bf16"
        self.input_dtype = torch.bfloat16 if bf16_weights else None
        return bf16_weights

    def _wrap(self, prep: PreparedModel, teacher: nn.Module | None, *, steps_per_epoch: int) -> None:
        cfg, model, deepspeed = self.cfg, prep.module, self._deepspeed
        # No loss scaler: config.py refuses train.precision=fp16 with engine=deepspeed.
        assert prep.grad_scaler is None
        # The loss of both engines (loss.py); the teacher is never handed to DeepSpeed.
        self.criterion = Criterion.from_config(cfg, self.autocast_dtype, teacher)

        ds_engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=prep.optimizer, config=self._ds_config, dist_init_required=False
        )
        if self.input_dtype is not None:  # bf16 weights
            check_buffers_fp32(model, deepspeed.__version__)
        self.model = ds_engine
        self._buffers: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():
            self._buffers.setdefault(b.dtype, []).append(b)
        self._ds = ds_engine
        # The torch SGD: under ZeRO its param group holds this rank's flat fp32 partition, so the
        # LambdaLR below (same object as the DDP engine builds) drives DeepSpeed's LR too.
        self.optimizer = ds_engine.basic_optimizer
        self.lr_scheduler = prep.build_lr_scheduler(self.optimizer)

        alpha_fn = None
        if self.adaptive is not None and self.adaptive.scope == "global":
            alpha_fn = _alpha_fn(self.adaptive)
        self.grad_processor = ShardedGradProcessor(
            [m.weight for m in prep.adders], alpha_fn=alpha_fn, max_norm=cfg.train.grad_clip
        )
        self.grad_processor.attach(ds_engine.basic_optimizer, ds_engine.optimizer)

    def _ensure_process_group(self) -> None:
        """DeepSpeed needs a process group and LOCAL_RANK even for one process."""
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))
        if not tdist.is_initialized():
            # One process without torchrun: a private in-memory store, no port to collide on.
            backend = device_policy.dist_backend(device_policy.DeviceInfo.probe(self.device))
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)

    # --- training -------------------------------------------------------------------------------
    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != self.micro_batch * self.accum_steps:
            raise ValueError(
                f"got a batch of {images.shape[0]} on rank {self.dist.rank}, expected "
                f"{self.micro_batch} x {self.accum_steps} micro-batches (train.global_batch_size "
                f"/ world size)"
            )
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        parts: dict[str, torch.Tensor] = {}
        chunks = zip(images.split(self.micro_batch), labels.split(self.micro_batch), strict=True)
        for i, (x, y) in enumerate(chunks):
            self._broadcast_buffers()
            loss, micro_parts = self.criterion(self._ds, x, y)
            for k, v in micro_parts.items():
                parts[k] = parts.get(k, 0) + v / self.accum_steps
            # DeepSpeed divides by gradient_accumulation_steps: the accumulated gradient is the
            # mean over the whole per-rank batch, like one DDP backward on it.
            self._ds.backward(loss)
            if i < self.accum_steps - 1:
                self._ds.step()  # not a boundary: only advances DeepSpeed's micro-step counter
            total += loss.detach()
        self.loss_parts = parts
        return total / self.accum_steps

    @torch.no_grad()
    def _broadcast_buffers(self) -> None:
        """Rank 0's BN running stats to every rank before each forward, as DDP does
        (``broadcast_buffers=True``); DeepSpeed never syncs buffers, so without this the ranks'
        running stats drift apart and eval/checkpoints differ from the DDP engine's.
        One coalesced broadcast per dtype (ResNet-50 has 159 BN buffers)."""
        if self.dist.world_size == 1 or not self._buffers:
            return
        for bufs in self._buffers.values():
            flat = _flatten_dense_tensors(bufs)
            tdist.broadcast(flat, src=0)
            for b, v in zip(bufs, _unflatten_dense_tensors(flat, bufs), strict=True):
                b.copy_(v)

    def step(self, want_grad_norm: bool = False) -> StepStats:
        proc = self.grad_processor
        proc.want_total_norm = want_grad_norm  # read by the pre-step hook of this step
        self._ds.step()  # boundary: reduce(-scatter) -> grad_processor pre-hook -> SGD step
        self.lr_scheduler.step()
        stats = StepStats()
        if self.adaptive is not None and self.adaptive.scope == "local":
            stats.adder_grad_norms, stats.adder_alphas = self.adaptive.scale_()
        elif self.adaptive is not None:
            stats.adder_grad_norms, stats.adder_alphas = proc.last_norms, proc.last_alphas
        if self.cfg.train.grad_clip is not None or want_grad_norm:
            stats.grad_norm = proc.last_total_norm
        return stats

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model (full under ZeRO-0/1/2: every rank holds all weights) and LR schedule.

        The optimizer state is sharded across ranks under ZeRO-1/2 and only exists in DeepSpeed's
        checkpoint folders (``save``), so it is ``None`` here.
        """
        return {
            "model": self._module.state_dict(),
            "optimizer": None,
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("optimizer") is not None:
            raise ValueError(
                "a DDP checkpoint's optimizer state cannot be loaded into the DeepSpeed engine; "
                "resume DeepSpeed runs from their own checkpoints"
            )
        self._module.load_state_dict(state["model"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])

    @property
    def checkpoint_store(self) -> CheckpointStore:
        """DeepSpeed checkpoint folders (checkpoint/store.py)."""
        return DEEPSPEED_FOLDER

    def save(self, path: Path, client_state: dict[str, Any]) -> None:
        """Collective. DeepSpeed's ``save_checkpoint`` into a temp folder, MANIFEST, rename.

        ``path`` (``checkpoints/step_<n>.pt``) becomes a FOLDER; see ds_checkpoint.py.
        """
        path = Path(path)
        tmp = ds_checkpoint.tmp_name(path)
        if self.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            ds_checkpoint.remove(tmp)  # left by a crash during an earlier save
        self.dist.barrier()
        state = {
            _CLIENT_KEY: client_state,
            "addernet_lr_scheduler": self.lr_scheduler.state_dict(),
            # DeepSpeed names the fp32 master shards and its buffer list by named_parameters() /
            # named_buffers(); a fused model's state_dict uses the unfused keys (models/fusion.py).
            # The converter needs the map.
            "addernet_state_keys": _state_keys(self._module),
        }
        try:
            self._ds.save_checkpoint(
                str(tmp.parent), tag=tmp.name, client_state=state, save_latest=False
            )
        except (OSError, RuntimeError) as e:  # torch's writer reports ENOSPC/EFBIG as RuntimeError
            raise ds_checkpoint.write_failed(path, e) from None
        self.dist.barrier()  # every rank's shard is on disk
        if self.dist.is_main:
            ds_checkpoint.write_manifest(
                tmp,
                {"zero_stage": self.cfg.deepspeed.zero_stage, "world_size": self.dist.world_size},
            )
            ds_checkpoint.publish(tmp, path)
        self.dist.barrier()

    def load(self, path: Path) -> dict[str, Any]:
        """Collective. Restores model, sharded optimizer state, LR schedule; returns client_state."""
        path = Path(path)
        if not DEEPSPEED_FOLDER.holds(path):
            raise CheckpointError(
                f"'{path}' is not a DeepSpeed checkpoint folder (engine=deepspeed saves folders); "
                "a DDP checkpoint file cannot resume a DeepSpeed run: resume it with engine=ddp, "
                "or start the DeepSpeed run in another output_dir"
            )
        problem = ds_checkpoint.check_compatible(
            path, zero_stage=self.cfg.deepspeed.zero_stage, world_size=self.dist.world_size
        )
        if problem is not None:
            raise CheckpointError(problem)
        # DeepSpeed unpickles its shards (torch.load(weights_only=False)): read them all safely
        # first (a planted folder is refused naming the file), and make its loader a safe one too.
        ds_checkpoint.check_loadable(path)
        self._ds.checkpoint_engine.load = ds_checkpoint.load_shard
        load_path, client = self._ds.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint '{path}'")
        self.lr_scheduler.load_state_dict(client["addernet_lr_scheduler"])
        return client[_CLIENT_KEY]


# The first DeepSpeed release whose bf16 mode casts parameters only (engine._cast_module_mixed_precision):
# 0.15.0-0.19.1 call module.bfloat16(), which casts the BN running statistics too (sources read).
DS_PARAMS_ONLY_CAST = "0.19.2"


def check_buffers_fp32(model: nn.Module, ds_version: str) -> None:
    """After ``deepspeed.initialize`` with bf16 weights: every floating buffer (the BN statistics) must
    still be fp32. Checked on the run's own model rather than trusted to a version pin: a DeepSpeed
    older than the pin in an existing environment, a ``buffer_dtype`` in a hand-written DeepSpeed
    config or a change of DeepSpeed's casting rule would otherwise round the statistics of adder
    outputs (-4000 ± 37) to 16 bits without a word."""
    bad = [
        n for n, b in model.named_buffers() if b.is_floating_point() and b.dtype != torch.float32
    ]
    if bad:
        dtype = dict(model.named_buffers())[bad[0]].dtype
        raise ConfigError(
            f"DeepSpeed {ds_version} cast {len(bad)} buffers of the model to {dtype} with "
            f"deepspeed.precision=bf16 (e.g. {bad[0]}); the BatchNorm statistics of adder outputs must "
            f"stay fp32. DeepSpeed casts parameters only from {DS_PARAMS_ONLY_CAST} on: pip install "
            f"'deepspeed>={DS_PARAMS_ONLY_CAST}', or set deepspeed.precision=autocast"
        )


def _alpha_fn(scaler: AdaptiveLRScaler):
    """eq. 33 factors from the trainer's AdaptiveLRScaler (the DDP engine's very function)."""
    return scaler.alphas
