"""Analyses that reproduce the paper's tables and figures on LeNet-5-BN / Fashion-MNIST.

Each sub-command prints its numbers and writes one PNG (matplotlib, Agg backend)::

    addernet-analyze table1   --out docs/figures/table1_grad_norms.png
        Table 1: l2 norm of every layer's filter gradient at the first iteration (before the
        adaptive LR scaling), AdderNet vs CNN, LeNet-5-BN on one real training batch.
    addernet-analyze weights  --adder runs/fm_adder/checkpoints/best.pt --cnn runs/fm_cnn/checkpoints/best.pt
        Figure 7: histogram of a trained layer's weights (default: the 3rd weight layer, as the
        paper), maximum-likelihood Laplace and Gaussian fits, which fits better (log-likelihood).
    addernet-analyze filters  --adder runs/fm_adder/checkpoints/best.pt --cnn runs/fm_cnn/checkpoints/best.pt
        Figure 5: the first layer's filters as images, AdderNet vs CNN, with two numbers behind
        "they share similar patterns": spatial smoothness, and how well each adder filter is
        matched by some CNN filter compared with random filters.
    addernet-analyze features --epochs 3
        Figure 1: 2-D (or --dim 3) features of a LeNet++-style net, CNN vs AdderNet.
    addernet-analyze ablation --epochs 2 --train-limit 12000
        Table 4: full-precision gradient x l2->l1 x adaptive LR, each run through addernet-train.
    addernet-analyze curves   --run AdderNet=runs/fm_adder --run CNN=runs/fm_cnn
        Learning curves (train loss, val top-1) and final accuracies side by side from metrics.jsonl.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``--data-root`` to use other IDX files).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.data.idx import FASHION_MNIST_CLASSES, IdxLoader
from addernet_dist.distributed import DistInfo
from addernet_dist.metrics import recalibrate_bn
from addernet_dist.models import create_model
from addernet_dist.nn import Adder2d, AdderLinear, adder_modules, set_p
from addernet_dist.runfolder import dumps_strict

# Paper Table 1 (LeNet-5-BN on MNIST, first iteration): layers 1-3.
PAPER_TABLE1 = {"AdderNet": (0.0009, 0.0012, 0.0146), "CNN": (0.2261, 0.2990, 0.4646)}
# Paper Table 4 (ResNet-20 on CIFAR-10): (full-precision grad, l2->l1, adaptive LR) -> top-1.
# The printed table has 8 columns whose check marks did not survive text extraction; only the
# two ends are unambiguous: none of the three -> 80.77%, all three -> 92.32%.
PAPER_TABLE4_ENDS = {(False, False, False): 80.77, (True, True, True): 92.32}

WEIGHT_TYPES = (nn.Conv2d, nn.Linear, Adder2d, AdderLinear)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv/linear/adder layer with a weight, in module order (the paper's "layer l")."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]


# ---------------------------------------------------------------------------------------------
# Table 1: gradient norms at the first iteration
# ---------------------------------------------------------------------------------------------


def first_iteration_grad_norms(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> list[tuple[str, float]]:
    """One forward/backward (cross-entropy, train mode) -> [(layer name, ||dL/dW||_2)] for every
    weight layer. No optimizer step and no adaptive scaling: the raw loss gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return [(n, float(m.weight.grad.norm())) for n, m in weight_layers(model)]


def table1(
    images: torch.Tensor, labels: torch.Tensor, *, model: str = "lenet5_bn", seed: int = 0
) -> dict[str, list[tuple[str, float]]]:
    """Gradient norms of the CNN, the l1 AdderNet (p = 1) and the AdderNet at the start of
    l2 -> l1 training (p = 2), each freshly initialised with ``seed``, on the same batch."""
    out = {}
    for label, conv, p in (("AdderNet (p=1)", "adder", 1.0), ("AdderNet (p=2)", "adder", 2.0)):
        torch.manual_seed(seed)
        net = create_model(model, conv=conv)
        set_p(net, p)
        out[label] = first_iteration_grad_norms(net, images, labels)
    torch.manual_seed(seed)
    out["CNN"] = first_iteration_grad_norms(create_model(model, conv="conv"), images, labels)
    return out


def format_table1(norms: dict[str, list[tuple[str, float]]]) -> str:
    names = [n for n, _ in next(iter(norms.values()))]
    rows = [
        "| model | " + " | ".join(f"layer {i + 1} ({n})" for i, n in enumerate(names)) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for label, vals in norms.items():
        rows.append(f"| {label} | " + " | ".join(f"{v:.4g}" for _, v in vals) + " |")
    for label, vals in PAPER_TABLE1.items():
        cells = [f"{v:.4f}" for v in vals] + ["-"] * (len(names) - len(vals))
        rows.append(f"| paper {label} (MNIST) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_table1(norms: dict[str, list[tuple[str, float]]], path: str) -> None:
    plt = _plt()
    names = [n for n, _ in next(iter(norms.values()))]
    x = np.arange(len(names))
    width = 0.8 / len(norms)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (label, vals) in enumerate(norms.items()):
        bars = ax.bar(
            x + (i - (len(norms) - 1) / 2) * width, [v for _, v in vals], width, label=label
        )
        ax.bar_label(bars, fmt="%.2g", fontsize=7, rotation=90, padding=2)
    ax.set_yscale("log")
    top = max(v for vals in norms.values() for _, v in vals)
    ax.set_ylim(top=top * 30)  # room for the bar labels and the legend
    ax.set_xticks(x, [f"{i + 1}: {n}" for i, n in enumerate(names)], fontsize=8)
    ax.set_ylabel(r"$\|\partial L/\partial W_l\|_2$ at iteration 1 (log)")
    ax.set_title("Table 1: filter-gradient norms, LeNet-5-BN, first iteration")
    ax.legend(fontsize=8, ncol=len(norms), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Figure 7: weight distributions
# ---------------------------------------------------------------------------------------------


def fit_laplace_gaussian(w: np.ndarray) -> dict[str, float]:
    """Maximum-likelihood fits and the mean log-likelihood per weight of each.

    Laplace: mu = median, b = mean |w - mu|. Gaussian: mu = mean, sigma = std (ddof 0).
    ``excess_kurtosis`` is 3 for a Laplace and 0 for a Gaussian distribution.
    """
    w = np.asarray(w, dtype=np.float64).ravel()
    mu_l = float(np.median(w))
    b = max(float(np.mean(np.abs(w - mu_l))), 1e-12)
    mu_g, sigma = float(w.mean()), max(float(w.std()), 1e-12)
    ll_l = float(np.mean(-math.log(2 * b) - np.abs(w - mu_l) / b))
    ll_g = float(
        np.mean(-0.5 * math.log(2 * math.pi * sigma**2) - (w - mu_g) ** 2 / (2 * sigma**2))
    )
    kurt = float(np.mean((w - mu_g) ** 4) / sigma**4 - 3.0)
    return {
        "n": int(w.size),
        "laplace_mu": mu_l,
        "laplace_b": b,
        "gauss_mu": mu_g,
        "gauss_sigma": sigma,
        "ll_laplace": ll_l,
        "ll_gauss": ll_g,
        "better": "Laplace" if ll_l > ll_g else "Gaussian",
        "excess_kurtosis": kurt,
    }


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
    from addernet_dist import checkpoint as ckpt

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint '{path}' does not exist; train one first, e.g. "
            "`addernet-train --config configs/fashion_mnist_lenet5_bn.yaml`"
        )
    try:
        state = ckpt.load_file(path)
    except ckpt.CheckpointError:
        state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' is not a checkpoint or state_dict file")
    # Trainer checkpoints: {"engine": {"model": ...}, "client": {"config": ...}}.
    engine, client = state.get("engine", {}), state.get("client", {})
    cfg = client.get("config") if isinstance(client, dict) else None
    kwargs: dict[str, Any] = {}
    if isinstance(cfg, dict):
        # The run's own config wins; the arguments are fallbacks for bare state_dicts.
        model = cfg.get("model", {}).get("name") or model
        conv = cfg.get("model", {}).get("conv") or conv
        kwargs = dict(cfg.get("model", {}).get("kwargs") or {})
        if cfg.get("model", {}).get("num_classes"):
            kwargs["num_classes"] = cfg["model"]["num_classes"]
    sd = engine.get("model") if isinstance(engine, dict) and "model" in engine else state
    if model is None or conv is None:
        raise ValueError(
            f"'{path}' holds no config naming the model; pass --model NAME and --conv adder|conv"
        )
    net = create_model(model, conv=conv, **kwargs)
    # Checkpoints of compiled / DDP-wrapped models prefix the keys.
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    net.load_state_dict(sd)
    net.eval()
    return (net, cfg if isinstance(cfg, dict) else None) if return_config else net


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


def plot_weights(layers: dict[str, tuple[str, np.ndarray, dict[str, float]]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 3.8), squeeze=False)
    for ax, (label, (lname, w, fit)) in zip(axes[0], layers.items()):
        lo, hi = np.percentile(w, [0.5, 99.5])
        ax.hist(w, bins=120, range=(lo, hi), density=True, color="0.7", label="weights")
        t = np.linspace(lo, hi, 400)
        lap = np.exp(-np.abs(t - fit["laplace_mu"]) / fit["laplace_b"]) / (2 * fit["laplace_b"])
        gau = np.exp(-((t - fit["gauss_mu"]) ** 2) / (2 * fit["gauss_sigma"] ** 2)) / (
            math.sqrt(2 * math.pi) * fit["gauss_sigma"]
        )
        ax.plot(t, lap, "r-", lw=1.5, label=f"Laplace (LL {fit['ll_laplace']:.3f})")
        ax.plot(t, gau, "b--", lw=1.5, label=f"Gaussian (LL {fit['ll_gauss']:.3f})")
        ax.set_title(f"{label}: {lname} ({fit['n']} weights)\nbetter fit: {fit['better']}")
        ax.set_xlabel("weight value")
        ax.legend(fontsize=8)
    fig.suptitle("Figure 7: weight histograms with max-likelihood fits (LL = mean log-lik.)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Figure 5: first-layer filters
# ---------------------------------------------------------------------------------------------


def _centred_unit(w: np.ndarray) -> np.ndarray:
    """(F, K) rows minus their mean, scaled to unit norm (Pearson correlation = dot product)."""
    w = w - w.mean(axis=1, keepdims=True)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def filter_smoothness(w: np.ndarray) -> float:
    """Mean correlation between horizontally and vertically adjacent taps of (F, C, kh, kw) filters,
    each filter centred first. ~0 for i.i.d. random filters; learned edge/blob detectors are smooth
    (> 0.3 for the first layers of LeNet-style nets)."""
    w = w - w.mean(axis=(1, 2, 3), keepdims=True)
    pairs = [
        (w[:, :, :, :-1].ravel(), w[:, :, :, 1:].ravel()),
        (w[:, :, :-1, :].ravel(), w[:, :, 1:, :].ravel()),
    ]
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def filter_match(a: np.ndarray, b: np.ndarray, *, trials: int = 200, seed: int = 0) -> dict:
    """How well each filter of ``a`` is matched by some filter of ``b``: the mean over ``a`` of the
    best |Pearson correlation| with a filter of ``b`` (sign-free: BN can flip a feature's sign), and
    the same statistic against ``trials`` sets of as many i.i.d. Gaussian filters (chance level)."""
    ua, ub = _centred_unit(a.reshape(len(a), -1)), _centred_unit(b.reshape(len(b), -1))
    best = np.abs(ua @ ub.T).max(axis=1)
    rng = np.random.default_rng(seed)
    chance = [
        np.abs(ua @ _centred_unit(rng.standard_normal(ub.shape)).T).max(axis=1).mean()
        for _ in range(trials)
    ]
    return {
        "best_abs_corr": [float(v) for v in best],
        "mean_best_abs_corr": float(best.mean()),
        "chance_mean": float(np.mean(chance)),
        "chance_p95": float(np.percentile(chance, 95)),
    }


def plot_filters(filters: dict[str, tuple[str, np.ndarray]], path: str) -> None:
    plt = _plt()
    rows = len(filters)
    cols = max(len(w) for _, w in filters.values())
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for r, (label, (lname, w)) in enumerate(filters.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(w):
                ax.axis("off")
                continue
            img = w[c].mean(axis=0)  # (kh, kw); first layers of LeNet have one input channel
            lo, hi = img.min(), img.max()
            ax.imshow((img - lo) / max(hi - lo, 1e-12), cmap="gray", vmin=0, vmax=1)
            if c == 0:
                ax.set_ylabel(f"{label}\n{lname}", fontsize=8)
    fig.suptitle("Figure 5: first-layer filters (each scaled to its own min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Figure 1: LeNet++ feature visualisation
# ---------------------------------------------------------------------------------------------


class LeNetPP(nn.Module):
    """LeNet++ (Wen et al. 2016, as used by paper §5.5): 6 convolutions (32, 32, 64, 64, 128, 128
    channels, scaled by ``width``), a max-pool after each pair, a ``dim``-D feature layer and a
    10-way classifier. CNN: Linear -> BN feature layer and a Linear classifier. AdderNet: as the paper,
    only the last fully-connected layers become adder layers: AdderLinear -> BN (features) and
    AdderLinear -> BN (logits = -l1 distance to a per-class template, then scaled)."""

    def __init__(
        self,
        conv: str = "conv",
        width: float = 1.0,
        dim: int = 2,
        kernel: int = 5,
        classes: int = 10,
    ) -> None:
        super().__init__()
        if conv not in ("conv", "adder"):
            raise ValueError(f"conv must be 'conv' or 'adder', got {conv!r}")
        if dim not in (2, 3):
            raise ValueError(f"feature dim must be 2 or 3 (something one can plot), got {dim}")
        chans = [max(1, round(c * width)) for c in (32, 32, 64, 64, 128, 128)]
        layers: list[nn.Module] = []
        cin = 1
        for i, c in enumerate(chans):
            layers += [
                nn.Conv2d(cin, c, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(c),
            ]
            layers += [nn.PReLU(c)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = c
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        flat = chans[-1] * 4 * 4  # 32 -> 16 -> 8 -> 4
        if conv == "adder":
            self.feature = nn.Sequential(AdderLinear(flat, dim), nn.BatchNorm1d(dim))
            self.classifier = nn.Sequential(AdderLinear(dim, classes), nn.BatchNorm1d(classes))
        else:
            # BN on the features too (same normalisation as the adder twin; without it the
            # 2-D bottleneck diverged to NaN within 2 epochs at LR 0.1 on Fashion-MNIST).
            self.feature = nn.Sequential(nn.Linear(flat, dim, bias=False), nn.BatchNorm1d(dim))
            self.classifier = nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_features_net(
    net: LeNetPP, loader: IdxLoader, *, epochs: int, lr: float = 0.1, eta: float = 0.2
) -> list[float]:
    """SGD-NAG (momentum 0.9, wd 5e-4), cosine LR over ``epochs``, gradient norm clipped at 5.
    Adder layers use the paper's
    full training algorithm: p decays 2 -> 1 over the first 3/4 of the steps and their gradients are
    rescaled by eq. 33 (the trainer's own :class:`AdaptiveLRScaler` and :class:`PSchedule`).
    Returns the mean training loss of each epoch."""
    from addernet_dist.adaptive_lr import AdaptiveLRScaler
    from addernet_dist.optim import PSchedule

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    adders = adder_modules(net)
    scaler = AdaptiveLRScaler(adders, eta) if adders else None
    psched = PSchedule(2.0, 1.0, decay_steps=round(0.75 * total))
    step, losses = 0, []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        net.train()
        tot = 0.0
        for x, y in loader:
            if adders:
                set_p(net, psched.value(step))
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            # A safety net for the 2-D bottleneck, the same for both nets; before eq. 33, which
            # then sets the adder layers' step size by itself.
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            if scaler is not None:
                scaler.scale_()
            opt.step()
            sched.step()
            step += 1
            tot += float(loss.detach())
        losses.append(tot / len(loader))
    if adders:
        set_p(net, 1.0)
    return losses


@torch.no_grad()
def collect_features(net: LeNetPP, loader: IdxLoader) -> tuple[np.ndarray, np.ndarray, float]:
    """(features (N, dim), labels (N,), top-1 accuracy) over ``loader`` in eval mode."""
    net.eval()
    feats, labels, correct = [], [], 0
    for x, y in loader:
        keep = y >= 0
        f = net.features(x[keep])
        correct += int((net.classifier(f).argmax(1) == y[keep]).sum())
        feats.append(f.numpy())
        labels.append(y[keep].numpy())
    f, y = np.concatenate(feats), np.concatenate(labels)
    return f, y, correct / max(1, len(y))


def feature_geometry(f: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """How the classes are arranged in feature space, as two nearest-prototype accuracies:
    ``angle``: nearest class mean DIRECTION by cosine (classes separated by angle, the CNN
    picture of Fig. 1); ``l1_centre``: nearest class median by l1 distance (classes clustered
    around centres, the AdderNet picture)."""
    classes = np.unique(y)
    unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    dirs = np.stack([unit[y == c].mean(0) for c in classes])
    dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-12)
    angle = classes[np.argmax(unit @ dirs.T, axis=1)]
    centres = np.stack([np.median(f[y == c], axis=0) for c in classes])
    l1 = classes[np.argmin(np.abs(f[:, None, :] - centres[None]).sum(-1), axis=1)]
    return {"angle": float((angle == y).mean()), "l1_centre": float((l1 == y).mean())}


def plot_features(panels: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str) -> None:
    plt = _plt()
    dim = next(iter(panels.values()))[0].shape[1]
    fig = plt.figure(figsize=(5.2 * len(panels), 4.8))
    cmap = plt.get_cmap("tab10")
    for i, (label, (f, y, acc)) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, len(panels), i, projection="3d" if dim == 3 else None)
        for c in range(10):
            sel = y == c
            pts = [f[sel, d] for d in range(dim)]
            ax.scatter(*pts, s=2, color=cmap(c), label=FASHION_MNIST_CLASSES[c], alpha=0.6)
        ax.set_title(f"{label} (test top-1 {100 * acc:.1f}%)")
        if i == len(panels):
            ax.legend(fontsize=7, markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"Figure 1: {dim}-D features of LeNet++ on Fashion-MNIST test images")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Table 4 ablation and learning curves (through addernet-train)
# ---------------------------------------------------------------------------------------------


def ablation_overrides(fp_grad: bool, lp: bool, adaptive: bool) -> list[str]:
    """Trainer overrides of one Table 4 column."""
    return [
        f"adder.full_precision_grad={str(fp_grad).lower()}",
        f"adder.p_schedule={str(lp).lower()}",
        f"adder.adaptive_lr={str(adaptive).lower()}",
    ]


def write_idx_subset(src: str | None, dst: Path, n_train: int) -> Path:
    """An IDX folder with the first ``n_train`` training images and the full test split (for
    reduced-cost ablations through the trainer, which reads whole splits). Idempotent."""
    from addernet_dist.data.idx import load_idx_split, write_idx

    if (dst / "t10k-labels-idx1-ubyte.gz").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for split, prefix, limit in (("train", "train", n_train), ("val", "t10k", None)):
        images, labels = load_idx_split(src, split)
        write_idx(dst / f"{prefix}-images-idx3-ubyte.gz", images[:limit].numpy())
        # labels last: their presence marks a complete folder
        write_idx(dst / f"{prefix}-labels-idx1-ubyte.gz", labels[:limit].numpy().astype(np.uint8))
    return dst


def run_trainer(config: str, overrides: Sequence[str], log_path: Path) -> None:
    """One ``addernet-train`` run in a subprocess (a fresh process per run: no state leaks between
    ablation arms); its output goes to ``log_path``. Raises with the log's tail if it fails."""
    cmd = [sys.executable, "-m", "addernet_dist.train", "--config", config, *overrides]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"addernet-train failed (exit {rc}); log {log_path}:\n{tail}")


def run_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Per-epoch train loss / val top-1 and the final top-1 of a trainer run folder."""
    from addernet_dist.logging_utils import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"'{path}' does not exist: is '{run_dir}' an addernet-train output_dir?"
        )
    recs = read_metrics(path)
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not evals:
        raise ValueError(f"'{path}' has no eval record; the run did not finish an epoch")
    train = [r for r in recs if r.get("kind") == "train"]
    by_epoch: dict[int, list[float]] = {}
    for r in train:
        by_epoch.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    return {
        "train_epochs": sorted(by_epoch),
        "train_loss": [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)],
        "eval_epochs": [int(r["epoch"]) for r in evals],
        "top1": [float(r["top1"]) for r in evals],
        "final_top1": float(evals[-1]["top1"]),
        "best_top1": max(float(r["top1"]) for r in evals),
    }


def _pct(v: float) -> float:
    """top-1 as a percentage whether the trainer logs a fraction or a percentage."""
    return 100.0 * v if v <= 1.0 else v


def plot_curves(runs: dict[str, dict[str, Any]], path: str) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, s in runs.items():
        a1.plot([e + 1 for e in s["train_epochs"]], s["train_loss"], marker=".", label=label)
        # Train records carry the 0-based epoch being trained, eval records the number of
        # completed epochs: both end up at "epochs done".
        a2.plot(s["eval_epochs"], [_pct(v) for v in s["top1"]], marker=".", label=label)
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss (mean over logged steps)")
    a1.set_yscale("log")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test top-1 (%)")
    a2.set_ylim(bottom=max(0.0, min(_pct(v) for s in runs.values() for v in s["top1"]) - 2))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("LeNet-5-BN on Fashion-MNIST: learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ablation(
    rows: list[tuple[tuple[bool, bool, bool], float, float | None]], path: str
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = ["\n".join("✓" if f else "·" for f in flags) for flags, _, _ in rows]
    vals = [v for _, v, _ in rows]
    recal = [r for _, _, r in rows]
    x = np.arange(len(rows))
    width = 0.4 if all(r is not None for r in recal) else 0.8
    bars = ax.bar(x - (width / 2 if width < 0.8 else 0), vals, width, label="trainer's final eval")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    if width < 0.8:
        bars = ax.bar(x + width / 2, recal, width, label="BN statistics recomputed")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        vals = vals + recal
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.set_xticks(x, labels, fontsize=9)
    ax.set_ylim(0.0, max(vals) + 15)  # room for the labels and the legend
    ax.set_ylabel("test top-1 (%)")
    ax.set_xlabel("rows of ticks: full-precision grad / l2->l1 / adaptive LR")
    ax.set_title("Table 4-style ablation, adder LeNet-5-BN on Fashion-MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cmd_table1(args) -> None:
    loader = IdxLoader(args.data_root, "train", batch_size=args.batch, seed=args.seed)
    images, labels = next(iter(loader))
    norms = table1(images, labels, model=args.model, seed=args.seed)
    print(
        f"Table 1: ||dL/dW_l||_2 at the first iteration ({args.model}, one batch of {len(labels)})"
    )
    print(format_table1(norms))
    ratio = [c / a for (_, a), (_, c) in zip(norms["AdderNet (p=1)"], norms["CNN"])]
    print("CNN / AdderNet(p=1) ratio per layer: " + ", ".join(f"{r:.3g}" for r in ratio))
    plot_table1(norms, args.out)
    _dump(args, {k: dict(v) for k, v in norms.items()})


def _cmd_weights(args) -> None:
    layers = {}
    for label, path in (("AdderNet", args.adder), ("CNN", args.cnn)):
        if path is None:
            continue
        net = load_trained_model(path, args.model, "adder" if label == "AdderNet" else "conv")
        wl = weight_layers(net)
        if not 1 <= args.layer <= len(wl):
            raise SystemExit(f"--layer {args.layer}: the model has weight layers 1..{len(wl)}")
        name, mod = wl[args.layer - 1]
        w = mod.weight.detach().double().numpy().ravel()
        layers[label] = (name, w, fit_laplace_gaussian(w))
    if not layers:
        raise SystemExit("give --adder CKPT and/or --cnn CKPT")
    print(f"Figure 7: weights of layer {args.layer}; mean log-likelihood per weight of ML fits")
    print("| model | layer | n | Laplace LL | Gaussian LL | better | excess kurtosis |")
    print("|---|---|---|---|---|---|---|")
    for label, (name, _, fit) in layers.items():
        print(
            f"| {label} | {name} | {fit['n']} | {fit['ll_laplace']:.4f} | {fit['ll_gauss']:.4f} | "
            f"{fit['better']} | {fit['excess_kurtosis']:.2f} |"
        )
    plot_weights(layers, args.out)
    _dump(args, {k: v[2] | {"layer": v[0]} for k, v in layers.items()})


def _cmd_filters(args) -> None:
    filters = {}
    for label, path in (("AdderNet", args.adder), ("CNN", args.cnn)):
        net = load_trained_model(path, args.model, "adder" if label == "AdderNet" else "conv")
        wl = weight_layers(net)
        if not 1 <= args.layer <= len(wl):
            raise SystemExit(f"--layer {args.layer}: the model has weight layers 1..{len(wl)}")
        name, mod = wl[args.layer - 1]
        w = mod.weight.detach().double().numpy()
        if w.ndim != 4:
            raise SystemExit(
                f"--layer {args.layer} ({name}) is not a convolution: no filters to draw"
            )
        filters[label] = (name, w)
    (an, aw), (cn, cw) = filters["AdderNet"], filters["CNN"]
    rng = np.random.default_rng(args.seed)
    result = {
        "AdderNet": {"layer": an, "smoothness": filter_smoothness(aw)},
        "CNN": {"layer": cn, "smoothness": filter_smoothness(cw)},
        "random_smoothness": float(
            np.mean([filter_smoothness(rng.standard_normal(aw.shape)) for _ in range(50)])
        ),
        "adder_matched_by_cnn": filter_match(aw, cw, seed=args.seed),
    }
    m = result["adder_matched_by_cnn"]
    print(f"Figure 5: filters of weight layer {args.layer} ({an} / {cn})")
    print("| | AdderNet | CNN | i.i.d. Gaussian |")
    print("|---|---|---|---|")
    print(
        f"| smoothness (adjacent-tap correlation) | {result['AdderNet']['smoothness']:.3f} "
        f"| {result['CNN']['smoothness']:.3f} | {result['random_smoothness']:.3f} |"
    )
    print(
        f"each adder filter's best |corr| with a CNN filter: mean {m['mean_best_abs_corr']:.3f} "
        f"(chance: {m['chance_mean']:.3f}, 95th percentile {m['chance_p95']:.3f})"
    )
    plot_filters(filters, args.out)
    _dump(args, result)


def _cmd_features(args) -> None:
    train = IdxLoader(
        args.data_root, "train", batch_size=args.batch, seed=args.seed, limit=args.train_limit
    )
    test = IdxLoader(args.data_root, "val", batch_size=512, limit=args.test_limit)
    panels, result = {}, {}
    for label, conv in (("CNN", "conv"), ("AdderNet", "adder")):
        torch.manual_seed(args.seed)
        net = LeNetPP(conv, width=args.width, dim=args.dim, kernel=args.kernel)
        t0 = time.perf_counter()
        losses = train_features_net(net, train, epochs=args.epochs)
        f, y, acc = collect_features(net, test)
        panels[label] = (f, y, acc)
        result[label] = {"train_loss": losses, "top1": acc, "seconds": time.perf_counter() - t0}
        print(
            f"{label}: LeNet++ (width x{args.width}, {args.kernel}x{args.kernel}), {args.epochs} "
            f"epoch(s), test top-1 {100 * acc:.2f}%, {result[label]['seconds']:.0f} s"
        )
        geo = feature_geometry(f, y)
        result[label]["geometry"] = geo
        print(
            f"  nearest-prototype accuracy of the features: by angle {100 * geo['angle']:.1f}%, "
            f"by l1 distance to class centres {100 * geo['l1_centre']:.1f}%"
        )
    plot_features(panels, args.out)
    _dump(args, result)


def _cmd_ablation(args) -> None:
    combos = list(itertools.product((False, True), repeat=3))
    if args.only:
        combos = [c for c in combos if "".join("1" if f else "0" for f in c) in args.only]
    out_root = Path(args.runs_dir)
    extra = list(args.set)
    if args.train_limit:
        root = write_idx_subset(
            args.data_root, out_root / f"data_{args.train_limit}", args.train_limit
        )
        extra.append(f"data.root={root}")
    rows = []
    for fp, lp, ad in combos:
        name = f"fp{int(fp)}_lp{int(lp)}_ad{int(ad)}"
        run_dir = out_root / name
        overrides = ablation_overrides(fp, lp, ad) + [
            f"train.epochs={args.epochs}",
            f"output_dir={run_dir}",
            # --fresh: start over; the old run in run_dir moves to run_dir/old-<time>/.
            *(["resume=none", "overwrite=true"] if args.fresh else ["resume=auto"]),
            'train.progress_bar="off"',  # bare off is YAML for False
            *extra,
        ]
        t0 = time.perf_counter()
        if not (args.reuse and (run_dir / "metrics.jsonl").is_file()):
            run_trainer(args.config, overrides, run_dir / "train.log")
        top1 = _pct(run_summary(run_dir)["final_top1"])
        recal = bn_recalibrated_top1(final_checkpoint(run_dir)) if args.recalibrate_bn else None
        rows.append(((fp, lp, ad), top1, recal))
        extra_s = "" if recal is None else f", BN-recalibrated {recal:.2f}%"
        print(f"{name}: top-1 {top1:.2f}%{extra_s}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("Table 4-style ablation (adder LeNet-5-BN, Fashion-MNIST)")
    print("| full-precision grad | l2->l1 | adaptive LR | top-1 (%) | BN-recalibrated top-1 (%) |")
    print("|---|---|---|---|---|")
    for (fp, lp, ad), v, r in rows:
        r_s = "-" if r is None else f"{r:.2f}"
        print(
            f"| {'x' if fp else ''} | {'x' if lp else ''} | {'x' if ad else ''} | {v:.2f} | {r_s} |"
        )
    print("paper (ResNet-20, CIFAR-10): none of the three 80.77%, all three 92.32%")
    plot_ablation(rows, args.out)
    _dump(
        args,
        [
            {"fp_grad": c[0], "lp": c[1], "adaptive": c[2], "top1": v, "top1_bn_recalibrated": r}
            for c, v, r in rows
        ],
    )


def _cmd_curves(args) -> None:
    runs = {}
    for item in args.run:
        label, sep, d = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {item!r}: expected LABEL=RUN_DIR")
        runs[label] = run_summary(d)
    print("| model | epochs | final test top-1 | best test top-1 |")
    print("|---|---|---|---|")
    for label, s in runs.items():
        print(
            f"| {label} | {len(s['eval_epochs'])} | {_pct(s['final_top1']):.2f}% | "
            f"{_pct(s['best_top1']):.2f}% |"
        )
    plot_curves(runs, args.out)
    _dump(args, runs)


def _dump(args, obj: Any) -> None:
    print(f"wrote {args.out}")
    if args.json:
        # Strict JSON: non-finite values as null (default=float first turns numpy/torch scalars into floats).
        Path(args.json).write_text(
            dumps_strict(json.loads(json.dumps(obj, default=float)), indent=1)
        )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="addernet-analyze", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, out):
        p.add_argument("--out", default=out, help="PNG to write (default: %(default)s)")
        p.add_argument("--json", default=None, help="also write the numbers as JSON here")
        p.add_argument("--data-root", default=None, help="IDX folder (default: Debian's path)")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("table1", help="Table 1: filter-gradient norms at the first iteration")
    common(p, "table1_grad_norms.png")
    p.add_argument("--model", default="lenet5_bn")
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(fn=_cmd_table1)

    p = sub.add_parser("weights", help="Figure 7: weight histograms, Laplace vs Gaussian")
    common(p, "fig7_weights.png")
    p.add_argument("--adder", help="AdderNet checkpoint")
    p.add_argument("--cnn", help="CNN checkpoint")
    p.add_argument("--model", default=None, help="model name if the checkpoint has no config")
    p.add_argument("--layer", type=int, default=3, help="1-based weight layer (paper: 3)")
    p.set_defaults(fn=_cmd_weights)

    p = sub.add_parser("filters", help="Figure 5: first-layer filters, AdderNet vs CNN")
    common(p, "fig5_filters.png")
    p.add_argument("--adder", required=True, help="AdderNet checkpoint")
    p.add_argument("--cnn", required=True, help="CNN checkpoint")
    p.add_argument("--model", default=None, help="model name if the checkpoint has no config")
    p.add_argument("--layer", type=int, default=1, help="1-based weight layer (paper: 1)")
    p.set_defaults(fn=_cmd_filters)

    p = sub.add_parser("features", help="Figure 1: LeNet++ feature visualisation")
    common(p, "fig1_features.png")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=2, choices=(2, 3))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    p.add_argument("--kernel", type=int, default=5, help="conv kernel size (LeNet++: 5)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.set_defaults(fn=_cmd_features)

    p = sub.add_parser("ablation", help="Table 4: the three training techniques on/off")
    common(p, "table4_ablation.png")
    p.add_argument("--config", default="configs/fashion_mnist_lenet5_bn.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/ablation")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images")
    p.add_argument(
        "--only", nargs="+", default=None, help="arms as bit strings fp/lp/ad, e.g. 000 111"
    )
    p.add_argument("--set", nargs="*", default=[], help="extra trainer overrides key=value")
    p.add_argument("--reuse", action="store_true", help="skip arms whose run folder has metrics")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="resume=none overwrite=true: start over, the old runs move to <run>/old-<time>/ (default: resume=auto)",
    )
    p.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="also report top-1 with BN statistics recomputed at the final p",
    )
    p.set_defaults(fn=_cmd_ablation)

    p = sub.add_parser("curves", help="learning curves + final accuracies from run folders")
    common(p, "lenet5_bn_curves.png")
    p.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeatable)")
    p.set_defaults(fn=_cmd_curves)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Missing data / checkpoint / run folder, bad argument, failed trainer run: the message
        # names the problem and the fix; a traceback would bury it.
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
