"""Table 1: the l2 norm of every layer's filter gradient at the first iteration (before the
adaptive LR scaling), AdderNet vs CNN, LeNet-5-BN on one real training batch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.analyze.common import _dump, _plt, _save_figure, weight_layers
from addernet_dist.data.idx import IdxLoader
from addernet_dist.models import create_model
from addernet_dist.nn import set_p

# Paper Table 1 (LeNet-5-BN on MNIST, first iteration): layers 1-3.
PAPER_TABLE1 = {"AdderNet": (0.0009, 0.0012, 0.0146), "CNN": (0.2261, 0.2990, 0.4646)}


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
    _save_figure(fig, path)


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
