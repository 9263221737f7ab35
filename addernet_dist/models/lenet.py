"""LeNet-5-BN (paper §5.2): LeNet-5 on 1×32×32 with BatchNorm after every layer but the last.

conv 5×5 1→6, pool, conv 5×5 6→16, pool, FC 400→120→84→classes, BN + ReLU after each hidden layer.
Unlike the CIFAR/ImageNet models, the paper's MNIST AdderNet replaces *every* layer — "we also replace the
multiplications in the fully connected layers with subtractions", giving ~2× the CNN's 435K operations as
additions and "almost no multiplication" — so ``adder_stem`` and ``adder_head`` default to True here. The
adder classifier is followed by BatchNorm1d (its raw outputs are negative ℓ1 distances, not logits); the CNN
twin has a plain linear classifier.
"""

from __future__ import annotations

from torch import nn

from addernet_dist.models.fusion import fuse_sequential
from addernet_dist.models.registry import layer_types, register_model


class LeNet5BN(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        conv: str = "adder",
        adder_stem: bool = True,
        adder_head: bool = True,
        **adder_kw,
    ) -> None:
        super().__init__()
        conv_layer, linear_layer = layer_types(conv, **adder_kw)
        self.features = nn.Sequential(
            (conv_layer if adder_stem else nn.Conv2d)(1, 6, 5, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            conv_layer(6, 16, 5, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(
            linear_layer(16 * 5 * 5, 120, bias=False),
            nn.BatchNorm1d(120),
            nn.ReLU(inplace=True),
            linear_layer(120, 84, bias=False),
            nn.BatchNorm1d(84),
            nn.ReLU(inplace=True),
        )
        if conv == "adder" and adder_head:
            self.classifier: nn.Module = nn.Sequential(
                linear_layer(84, num_classes, bias=False), nn.BatchNorm1d(num_classes)
            )
        else:
            self.classifier = nn.Linear(84, num_classes)

    def fuse_adder_bn(self) -> LeNet5BN:
        """Fuse the adder convolutions of ``features`` with their BN and ReLU into FusedAdderBN2d, in
        place (models/fusion.py); the classifier's AdderLinear + BatchNorm1d pairs are not fused."""
        fuse_sequential(self.features)
        return self

    def forward(self, x):
        return self.classifier(self.fc(self.features(x).flatten(1)))


@register_model("lenet5_bn", (1, 32, 32), 10)
def lenet5_bn(conv: str = "adder", num_classes: int = 10, **kw) -> LeNet5BN:
    return LeNet5BN(num_classes=num_classes, conv=conv, **kw)
