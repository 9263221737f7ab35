"""Figure 1: 2-D (or 3-D) features of a LeNet++-style net, CNN vs AdderNet, trained here with the
trainer's own eq. 33 scaler and p schedule."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.analyze.common import _dump, _plt, _save_figure
from addernet_dist.data.idx import FASHION_MNIST_CLASSES, IdxLoader
from addernet_dist.nn import AdderLinear, adder_modules, set_p


class LeNetPP(nn.Module):
    """LeNet++ (Wen et al. 2016, as used by paper §5.5): 6 convolutions (32, 32, 64, 64, 128, 128
    channels, scaled by ``width``), a max-pool after each pair, a ``dim``-D feature layer and a
    10-way classifier. CNN: Linear -> BN feature layer and a Linear classifier. AdderNet: as the
    paper, only the last fully-connected layers become adder layers: AdderLinear -> BN (features)
    and AdderLinear -> BN (logits = -l1 distance to a per-class template, then scaled)."""

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
    _save_figure(fig, path, f"Figure 1: {dim}-D features of LeNet++ on Fashion-MNIST test images")


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
