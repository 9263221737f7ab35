"""The distinct adder-layer shapes of a registered model (ResNet-18/50, ...), without running it.

The CNN twin of the model (same architecture, ``nn.Conv2d`` where the AdderNet has ``Adder2d``) runs on
the ``meta`` device — shapes only, no memory, no arithmetic — and forward hooks record each layer's
input and output size; the layers the AdderNet makes adder layers (every conv but the stem) are kept.
Used by the SASS report / throughput model (benchmarks/kernel_report.py), ``addernet-warmup`` and the
self-test's speed table.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from addernet_dist.models.registry import create_model, model_info
from addernet_dist.nn import Adder2d


@dataclass(frozen=True)
class LayerShape:
    c: int  # input channels
    o: int  # output channels
    k: int  # square kernel size
    stride: int
    pad: int
    h: int  # input height = width (square inputs)
    p: int  # output height = width
    count: int = 1  # layers of the model with this shape
    names: tuple[str, ...] = field(default=(), compare=False)

    @property
    def macs_per_image(self) -> int:
        return self.c * self.o * self.k * self.k * self.p * self.p

    @property
    def label(self) -> str:
        return f"{self.c}→{self.o} {self.k}×{self.k}/s{self.stride} @{self.h}²"


def adder_layer_shapes(model: str, image_size: int | None = None) -> list[LayerShape]:
    """Distinct adder-layer shapes of ``model`` in first-use order, with how many layers share each."""
    adder = create_model(model, conv="adder")
    adder_names = {n for n, m in adder.named_modules() if isinstance(m, Adder2d)}
    twin = create_model(model, conv="conv").to("meta")
    c, h, _ = model_info(model).input_shape
    h = image_size or h
    seen: OrderedDict[tuple, list[str]] = OrderedDict()
    hooks = []
    for name, mod in twin.named_modules():
        if name in adder_names and isinstance(mod, nn.Conv2d):

            def hook(m, inp, out, name=name):
                x = inp[0]
                key = (
                    m.in_channels,
                    m.out_channels,
                    m.kernel_size[0],
                    m.stride[0],
                    m.padding[0],
                    x.shape[2],
                    out.shape[2],
                )
                seen.setdefault(key, []).append(name)

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        twin(torch.empty(1, c, h, h, device="meta"))
    for hk in hooks:
        hk.remove()
    if len(sum(seen.values(), [])) != len(adder_names):
        raise RuntimeError(f"{model}: found {len(seen)} shapes for {len(adder_names)} adder layers")
    return [LayerShape(*k, count=len(v), names=tuple(v)) for k, v in seen.items()]
