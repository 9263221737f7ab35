"""Trained models for the analyses: a checkpoint (or bare state_dict) as a model, a run folder's
final checkpoint, and top-1 with BatchNorm statistics recomputed at the model's p."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from addernet_dist.analyze.common import weight_layers
from addernet_dist.distributed import DistInfo
from addernet_dist.metrics import recalibrate_bn
from addernet_dist.models import create_model
from addernet_dist.trained_weights import read_trained_weights


def load_trained_model(
    path: str | os.PathLike,
    model: str | None = None,
    conv: str | None = None,
    return_config: bool = False,
):
    """A model (eval mode) from a trainer checkpoint (``checkpoints/*.pt``) or a plain
    ``state_dict`` file. The model name and conv kind come from the checkpoint's resolved config
    when it has one, else from ``model``/``conv``. ``return_config``: also return that config
    (a dict, or None for a bare state_dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint '{path}' does not exist; train one first, e.g. "
            "`addernet-train --config configs/fashion_mnist_lenet5_bn.yaml`"
        )
    weights = read_trained_weights(path, allow_state_dict=True)
    cfg = weights.config
    kwargs: dict[str, Any] = {}
    if cfg is not None:
        # The run's own config wins; the arguments are fallbacks for bare state_dicts.
        model = cfg.get("model", {}).get("name") or model
        conv = cfg.get("model", {}).get("conv") or conv
        kwargs = dict(cfg.get("model", {}).get("kwargs") or {})
        if cfg.get("model", {}).get("num_classes"):
            kwargs["num_classes"] = cfg["model"]["num_classes"]
    if model is None or conv is None:
        raise ValueError(
            f"'{path}' holds no config naming the model; pass --model NAME and --conv adder|conv"
        )
    net = create_model(model, conv=conv, **kwargs)
    net.load_state_dict(weights.model)
    net.eval()
    return (net, cfg) if return_config else net


def trained_layer(path: str | os.PathLike, label: str, args) -> tuple[str, torch.nn.Module]:
    """Weight layer ``args.layer`` (1-based, ``common.weight_layers``) of the trained "AdderNet" or
    "CNN" (``label``) at ``path``: the figure 5 and 7 commands' input."""
    net = load_trained_model(path, args.model, "adder" if label == "AdderNet" else "conv")
    wl = weight_layers(net)
    if not 1 <= args.layer <= len(wl):
        raise SystemExit(f"--layer {args.layer}: the model has weight layers 1..{len(wl)}")
    return wl[args.layer - 1]


def final_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest ``step_*.pt`` of a trainer run folder (the end-of-training weights)."""
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))
    if not found:
        raise FileNotFoundError(f"no checkpoints/step_*.pt in '{run_dir}'")
    return found[-1]


@torch.no_grad()
def bn_recalibrated_top1(
    ckpt_path: str | os.PathLike, batches: int = 20, seed: int = 0, batch_size: int | None = None
) -> float:
    """Top-1 (%) on the run's val split after recomputing every BatchNorm's running statistics
    from ``batches`` training batches (of the run's global batch size unless given) at the
    model's current p.

    Why: the trainer's running statistics average over the last ~10 steps (momentum 0.1) while p
    is still moving, and an adder layer's output scale depends strongly on p, so a model evaluated
    during (or just after) the l2 -> l1 decay is judged with stale statistics. Measured on the
    3-epoch Fashion-MNIST run: 53.5% with the saved statistics after epoch 2 (p = 1.11), 88.3%
    after recalibration.
    """
    from addernet_dist.data import DataConfig, build_loader

    net, cfg = load_trained_model(ckpt_path, return_config=True)
    if cfg is None:
        raise ValueError(f"'{ckpt_path}' has no run config to build its data loaders from")
    dcfg = DataConfig.model_validate(cfg["data"])
    batch_size = batch_size or int(cfg.get("train", {}).get("global_batch_size", 256))
    kw = dict(batch_size=batch_size, rank=0, world_size=1, seed=seed, device="cpu")
    recalibrate_bn(net, build_loader(dcfg, "train", **kw), DistInfo(), num_batches=batches)
    net.eval()
    correct = count = 0
    for x, y in build_loader(dcfg, "val", **kw):
        keep = y >= 0
        correct += int((net(x[keep]).argmax(1) == y[keep]).sum())
        count += int(keep.sum())
    return 100.0 * correct / max(1, count)
