"""VGG-small for CIFAR (Cai et al., HWGQ, the paper's ref. [10]; Table 2): six 3×3 layers 128-128-256-256-
512-512 with max-pooling after every second, BN + ReLU after each, and one classifier over 512·4·4."""

from __future__ import annotations

from torch import nn

from addernet_dist.models.fusion import fuse_sequential
from addernet_dist.models.registry import layer_types, register_model


class VGGSmall(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        conv: str = "adder",
        adder_stem: bool = False,
        adder_head: bool = False,
        **adder_kw,
    ) -> None:
        super().__init__()
        conv_layer, linear_layer = layer_types(conv, **adder_kw)
        widths = (128, 128, 256, 256, 512, 512)
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate(widths):
            layer = conv_layer if (i > 0 or adder_stem) else nn.Conv2d
            layers.append(layer(cin, cout, 3, padding=1, bias=False))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        feat = 512 * 4 * 4
        if adder_head:
            self.classifier: nn.Module = nn.Sequential(
                linear_layer(feat, num_classes, bias=False), nn.BatchNorm1d(num_classes)
            )
        else:
            self.classifier = nn.Linear(feat, num_classes)

    def fuse_adder_bn(self) -> VGGSmall:
        """Fuse each adder layer of ``features`` with its BN (and ReLU) into FusedAdderBN2d, in place
        (models/fusion.py). Layers 2, 4, 6 have their max-pool between the layer and the BN: unfused."""
        fuse_sequential(self.features)
        return self

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register_model("vgg_small", (3, 32, 32), 10, fixed_size=True)  # classifier over 512*4*4
def vgg_small(conv: str = "adder", num_classes: int = 10, **kw) -> VGGSmall:
    return VGGSmall(num_classes=num_classes, conv=conv, **kw)
