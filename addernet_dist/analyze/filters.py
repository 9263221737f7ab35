"""Figure 5: the first layer's filters as images, AdderNet vs CNN, with two numbers behind "they
share similar patterns": spatial smoothness, and how well each adder filter is matched by some CNN
filter compared with random filters."""

from __future__ import annotations

import numpy as np

from addernet_dist.analyze.checkpoints import trained_layer
from addernet_dist.analyze.common import _dump, _plt, _save_figure


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
    _save_figure(fig, path, "Figure 5: first-layer filters (each scaled to its own min-max)")


def _cmd_filters(args) -> None:
    filters = {}
    for label, path in (("AdderNet", args.adder), ("CNN", args.cnn)):
        name, mod = trained_layer(path, label, args)
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
