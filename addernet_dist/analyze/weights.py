"""Figure 7: histogram of a trained layer's weights with maximum-likelihood Laplace and Gaussian
fits, and which fits better (log-likelihood)."""

from __future__ import annotations

import math

import numpy as np

from addernet_dist.analyze.checkpoints import trained_layer
from addernet_dist.analyze.common import _dump, _plt, _save_figure


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
    _save_figure(fig, path, "Figure 7: weight histograms with max-likelihood fits (LL = mean log-lik.)")


def _cmd_weights(args) -> None:
    layers = {}
    for label, path in (("AdderNet", args.adder), ("CNN", args.cnn)):
        if path is None:
            continue
        name, mod = trained_layer(path, label, args)
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
