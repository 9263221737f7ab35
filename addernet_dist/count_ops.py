"""Count multiplications and additions of a model, the convention of the paper's Tables 2 and 3.

Convention (per input image, found by running one forward pass with hooks):
  * a convolution / linear layer: one multiply-accumulate per weight tap and output element, i.e.
    ``k²·(Cin/groups)·Cout·H'·W'`` multiplications **and** as many additions (bias ignored);
  * an adder layer: ``|x − w|`` is one subtraction and accumulating it one addition, so twice that many
    additions and no multiplication;
  * BatchNorm, pooling, activations and residual additions are not counted (the paper: "computational cost in
    batch normalization layer ... [is] significantly less", §5.3).
  * the official AdderNet classifier (``head="linear_bn"``: a 1×1 conv == linear, then BN over the logits)
    counts its linear like any other (``feat·classes`` mul); its BN is a BN (and folds into that linear).
``exclude_first_last=True`` additionally drops the first and the last counted layer — the paper's convention
for its CIFAR table ("we omit these layers when counting FLOPs", §5.3), which is why its AdderNets show 0 #Mul
although the stem convolution and classifier stay full precision.

``addernet-count-ops`` prints the paper-style table for every model and the difference to the printed figures.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence

import torch
from torch import nn

from addernet_dist.nn import Adder2d, AdderLinear


def _layer_ops(module: nn.Module, out: torch.Tensor) -> tuple[str, int] | None:
    """(kind, multiply-accumulate count) for one image, or None for uncounted modules."""
    if isinstance(module, (nn.Conv2d, Adder2d)):
        kh, kw = module.kernel_size
        groups = getattr(module, "groups", 1)
        macs = kh * kw * (module.in_channels // groups) * out.shape[1] * out.shape[2] * out.shape[3]
        return ("adder" if isinstance(module, Adder2d) else "mul", macs)
    if isinstance(module, (nn.Linear, AdderLinear)):
        rows = out.numel() // out.shape[-1] // out.shape[0]
        macs = module.in_features * module.out_features * rows
        return ("adder" if isinstance(module, AdderLinear) else "mul", macs)
    return None


def layer_ops(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, str, int]]:
    """Per counted layer, in execution order: (module name, "mul" | "adder", MACs per image)."""
    rows: list[tuple[str, str, int]] = []
    # Shapes are all we need: a meta-device copy runs the forward without any arithmetic
    # (ResNet-50's 4 G adder MACs took ~20 s on 2 CPU cores through the reference operator).
    model = copy.deepcopy(model).to("meta")
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(mod, _inp, out):
        r = _layer_ops(mod, out)
        if r is not None:
            rows.append((names[mod], r[0], r[1]))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, Adder2d, nn.Linear, AdderLinear)):
            hooks.append(m.register_forward_hook(hook))
    model.eval()  # BatchNorm1d refuses batch 1 in training mode; counts don't depend on the mode
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, device="meta"))
    return rows


def count_ops(
    model: nn.Module, input_shape: Sequence[int], exclude_first_last: bool = False
) -> dict[str, int]:
    """{"mul": int, "add": int} for one image of ``input_shape`` = (C, H, W) (see module docstring)."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) for one image, got {tuple(input_shape)}")
    rows = layer_ops(model, input_shape)
    if exclude_first_last:
        rows = rows[1:-1]
    mul = sum(macs for _, kind, macs in rows if kind == "mul")
    add = sum(macs if kind == "mul" else 2 * macs for _, kind, macs in rows)
    return {"mul": mul, "add": add}


# The paper's printed #Mul of each CNN (Tables 2, 3 and §5.2); the AdderNet's #Add is printed as twice that.
PAPER_CNN_MUL = {
    "lenet5_bn": 435e3,
    "vgg_small": 0.65e9,
    "resnet20": 41.17e6,
    "resnet32": 69.12e6,
    "resnet18": 1.8e9,
    "resnet50": 3.9e9,
}


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def table(models: Sequence[str] | None = None) -> list[dict]:
    """Rows of the paper-style table: counts for the CNN and the AdderNet of each model."""
    from addernet_dist.models import create_model, list_models, model_info

    out = []
    for name in models or list_models():
        info = model_info(name)
        row: dict = {"model": name}
        for conv in ("conv", "adder"):
            m = create_model(name, conv=conv)
            row[conv] = count_ops(m, info.input_shape)
            row[conv + "_body"] = count_ops(m, info.input_shape, exclude_first_last=True)
        row["paper_mul"] = PAPER_CNN_MUL.get(name)
        out.append(row)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="addernet-count-ops",
        description="#Mul/#Add of the CNN and AdderNet of each model (paper Tables 2 and 3).",
    )
    ap.add_argument("models", nargs="*", help="model names (default: all registered)")
    args = ap.parse_args(argv)
    rows = table(args.models or None)
    hdr = (
        f"{'model':<10} {'CNN #Mul':>9} {'CNN #Add':>9} {'Adder #Mul':>10} {'Adder #Add':>10}  "
        f"{'body Adder #Add':>15}  {'paper CNN #Mul':>14}  {'ours/paper':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        paper = r["paper_mul"]
        ratio = f"{r['conv']['mul'] / paper:.3f}" if paper else "-"
        print(
            f"{r['model']:<10} {_fmt(r['conv']['mul']):>9} {_fmt(r['conv']['add']):>9} "
            f"{_fmt(r['adder']['mul']):>10} {_fmt(r['adder']['add']):>10}  "
            f"{_fmt(r['adder_body']['add']):>15}  {(_fmt(paper) if paper else '-'):>14}  {ratio:>10}"
        )
    print(
        "\nCounted: conv/linear = k²·Cin·Cout·H'·W' mul + as many add; adder = 2× that in add, no mul;"
        "\nBN, pooling, activations, residual adds not counted. 'Adder' columns keep the default"
        "\nfull-precision stem and classifier (their MACs count as mul); 'body' drops the first and last"
        "\nlayer, the paper's CIFAR convention, which is why the paper prints 0 #Mul for AdderNets."
    )


if __name__ == "__main__":
    main()
