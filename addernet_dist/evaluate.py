"""Evaluate a checkpoint: top-1 / top-5 / loss on the validation split, exact under torchrun.

    addernet-eval --checkpoint runs/digits/checkpoints/best.pt
    addernet-eval --ema --checkpoint runs/digits/checkpoints/best_ema.pt   # train.ema_decay runs
    addernet-eval --config configs/digits.yaml --checkpoint PATH data.root=/other/place
    torchrun --standalone --nproc_per_node=2 -m addernet_dist.evaluate --checkpoint PATH

Without ``--config`` the run's resolved config stored in the checkpoint is used; dotted overrides
apply on top either way. Prints one JSON line on rank 0:
``{"top1": ..., "top5": ..., "loss": ..., "count": ..., "checkpoint": ...}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from addernet_dist import checkpoint
from addernet_dist.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.engine.base import check_adder_backend, resolve_autocast_dtype
from addernet_dist.interop import InteropError, check_finite, describe_mismatch
from addernet_dist.logging_utils import setup_console_logging
from addernet_dist.metrics import EvalResult, evaluate
from addernet_dist.runfolder import dumps_strict
from addernet_dist.trained_weights import read_trained_weights


def evaluate_weights(cfg: Config, model_state: dict, dist: DistInfo) -> EvalResult:
    """Build the val loader and model of ``cfg``, load ``model_state`` into it, evaluate
    (collective)."""
    model, val_loader, dtype = build_eval_model(cfg, model_state, dist)
    return evaluate(model, val_loader, dist, autocast_dtype=dtype)


def build_eval_model(cfg: Config, model_state: dict, dist: DistInfo):
    """(model with ``model_state`` on the device, the val loader, the autocast dtype) as addernet-eval
    evaluates them: the unfused model of ``cfg`` (addernet-selftest compares its logits with the fused
    model's)."""
    from addernet_dist.build import build_model, build_split, seed_everything

    seed_everything(cfg.train.seed)
    check_adder_backend(cfg.adder.backend, dist.device)  # build_model gives it to the adder layers
    # Only the val split: a train loader would scan the whole train tree (1.28M files on ImageNet).
    val_loader = build_split(cfg, dist, "val")
    model = build_model(cfg, val_loader.num_classes)
    problem = describe_mismatch(model.state_dict(), model_state, {})
    if problem:  # the keys and shapes that differ, not load_state_dict's first line
        raise ConfigError(
            f"the checkpoint's weights do not fit model {cfg.model.name} "
            f"(conv={cfg.model.conv}, model.num_classes={cfg.model.num_classes}) built from the "
            f"config:\n{problem}\nevaluate it with the config stored in the checkpoint (omit "
            "--config) or set model.* to match"
        )
    model.load_state_dict(model_state)
    model.to(dist.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = resolve_autocast_dtype(cfg.train.precision, dist.device)  # what the trainer's eval uses
    return model, val_loader, dtype


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="addernet-eval", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a step_*.pt or best.pt file")
    ap.add_argument("--config", help="YAML config; default: the config stored in the checkpoint")
    ap.add_argument(
        "--ema",
        action="store_true",
        help="evaluate the checkpoint's EMA of the weights (train.ema_decay; best_ema.pt) instead of the model",
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/path")
    args = ap.parse_args(argv)
    path = Path(args.checkpoint)
    try:
        try:
            weights = read_trained_weights(path, ema=args.ema)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"{e}; pass a step_*.pt or best.pt written by addernet-train") from e
        try:  # a NaN model would print top-1 = chance and "loss": null with exit 0
            check_finite({k: v for k, v in weights.model.items() if torch.is_tensor(v)}, path)
        except InteropError as e:
            raise ConfigError(f"{e}; evaluate an earlier checkpoint of the run") from None
        saved = (weights.config or {}).get("model", {})
        if args.config:
            cfg = load_config(args.config, args.overrides)
            if saved and (saved.get("name"), saved.get("conv")) != (cfg.model.name, cfg.model.conv):
                raise ConfigError(
                    f"'{path}' holds model {saved.get('name')} (conv={saved.get('conv')}), the "
                    f"config builds {cfg.model.name} (conv={cfg.model.conv}); omit --config to "
                    "use the checkpoint's own config, or set model.* to match"
                )
        elif weights.config is None:
            raise ConfigError(f"'{path}' holds no run config; pass --config CONFIG.yaml")
        else:
            cfg = config_from_dict(apply_overrides(weights.config, args.overrides))
        dist = init_distributed(cfg.train.device)
        setup_console_logging(dist.rank)
        ok = False
        try:
            result = evaluate_weights(cfg, weights.model, dist)
            ok = True
        finally:
            destroy_distributed(dist, ok)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if dist.is_main:
        # Strict JSON: a non-finite loss prints as null (json.dumps would write NaN).
        out = {**result.as_dict(prefix=""), "checkpoint": str(path), **({"ema": True} if args.ema else {})}
        print(dumps_strict(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
