"""One ResNet definition for AdderNets and their CNN twins: the layer type is passed in.

ImageNet ResNet-18/50 follow torchvision exactly (v1.5: stride on the 3×3 of the bottleneck; 1×1 + BN
downsample), so ``conv="conv"`` has torchvision's parameter count. CIFAR ResNet-8/20/32 follow He et al.
§4.2 with the original AdderNet code's projection shortcut (adder 1×1 + BN, not zero padding).
By default the stem convolution and the classifier stay full precision (paper §5.3, the original code);
``adder_stem=True`` / ``adder_head=True`` make them adder layers (an adder classifier is followed by
BatchNorm1d: adder outputs are all negative with O(K) magnitude and are not usable as logits raw).

``head="linear_bn"`` is the classifier of the official AdderNet ResNets (huawei-noah/AdderNet
resnet20.py / resnet50.py, the published checkpoints): a 1×1 convolution on the pooled features — here
the equivalent ``nn.Linear`` — with (ResNet-50) or without (ResNet-20) bias, followed by a BatchNorm over
the logits. It lives in ``fc`` as ``Sequential(Linear, BatchNorm1d)`` (keys ``fc.0.*``, ``fc.1.*``;
``addernet_dist.interop`` maps the official ``fc.weight``/``bn2.*`` onto them).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from addernet_dist.models.fusion import fuse_block_pairs, fuse_pair, fuse_sequential
from addernet_dist.models.registry import layer_types, register_model

# "linear": nn.Linear (torchvision's); "linear_bn": the official AdderNet classifier (module docstring).
HEADS = ("linear", "linear_bn")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, conv_layer: Callable, downsample):
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.fused_epilogues = False  # set by fuse_adder_bn()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused_epilogues:
            # conv1 = fused(adder, bn1, ReLU), conv2 = fused(adder, bn2, ReLU) taking the residual:
            # relu(bn2(conv2(·)) + identity) is one epilogue in inference.
            return self.conv2(self.conv1(x), residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def fuse_adder_bn(self) -> BasicBlock:
        """Fuse (conv1, bn1), (conv2, bn2) and the downsample into FusedAdderBN2d (models/fusion.py), in
        place; when both convolutions fuse, the ReLUs and the residual add move into their epilogues."""
        _fuse_block(self, ("conv1", "bn1"), ("conv2", "bn2"))
        return self


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, conv_layer: Callable, downsample):
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv_layer(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv_layer(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.fused_epilogues = False  # set by fuse_adder_bn()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused_epilogues:  # as BasicBlock's: ReLUs and the residual add in conv1..3's epilogues
            return self.conv3(self.conv2(self.conv1(x)), residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def fuse_adder_bn(self) -> Bottleneck:
        """As BasicBlock's, for (conv1, bn1), (conv2, bn2), (conv3, bn3)."""
        _fuse_block(self, ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
        return self


def _fuse_block(block: BasicBlock | Bottleneck, *pairs: tuple[str, str]) -> None:
    if block.downsample is not None:
        fuse_sequential(block.downsample)  # adder 1×1 + BN, no ReLU: relu(out + identity) follows
    convs = fuse_block_pairs(block, *pairs)
    if convs is None:
        return  # a CNN twin, or an adder layer that could not be fused: the unfused forward
    for c in convs:
        c.relu = True  # the block applies ReLU after every BN, the last one after the residual add
    block.fused_epilogues = True


class ResNet(nn.Module):
    """ResNet over a given layer type. ``stem="imagenet"``: 7×7/2 conv + 3×3/2 max-pool, widths
    64·2^i; ``stem="cifar"``: 3×3 conv, widths 16·2^i, no pooling. ``width`` overrides the first
    stage's width (64 / 16), e.g. ``model.kwargs.width=4`` for the interpreter CI run, where the
    Triton interpreter's cost grows with the channel count."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        num_classes: int,
        conv: str = "adder",
        stem: str = "imagenet",
        adder_stem: bool = False,
        adder_head: bool = False,
        width: int | None = None,
        head: str = "linear",
        head_bias: bool = True,
        **adder_kw,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if adder_head and head != "linear":
            raise ValueError(
                f"adder_head=True and head={head!r} both choose the classifier; use one of them"
            )
        conv_layer, linear_layer = layer_types(conv, **adder_kw)
        stem_conv = conv_layer if adder_stem else nn.Conv2d
        if width is not None and width < 1:
            raise ValueError(f"width must be a positive channel count, got {width}")
        if stem == "imagenet":
            width = width or 64
            self.conv1 = stem_conv(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "cifar":
            width = width or 16
            self.conv1 = stem_conv(3, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = width
        # torchvision's attribute names (layer1..layerN), so the CNN twin loads torchvision weights as-is.
        self.num_stages = len(layers)
        for i, n in enumerate(layers):
            stage = self._make_stage(block, width * 2**i, n, 1 if i == 0 else 2, conv_layer)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        feat = self.inplanes
        if adder_head:
            # An adder classifier's raw outputs are −ℓ1 distances (all < 0, scale O(feat)): BN makes logits.
            self.fc: nn.Module = nn.Sequential(
                linear_layer(feat, num_classes, bias=False), nn.BatchNorm1d(num_classes)
            )
        elif head == "linear_bn":
            # The official AdderNet classifier (1×1 conv == linear on the 1×1 pooled map, then BN).
            self.fc = nn.Sequential(
                nn.Linear(feat, num_classes, bias=head_bias), nn.BatchNorm1d(num_classes)
            )
        else:
            self.fc = nn.Linear(feat, num_classes, bias=head_bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_stage(
        self, block, planes: int, blocks: int, stride: int, conv_layer
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv_layer(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        out = [block(self.inplanes, planes, stride, conv_layer, downsample)]
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes, 1, conv_layer, None) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def fuse_adder_bn(self) -> ResNet:
        """Fuse an adder stem (``adder_stem=True``) with its BN, in place (the blocks fuse themselves:
        models/fusion.py ``fuse_adder_bn`` walks every module); a full-precision stem stays as it is."""
        fuse_pair(self, "conv1", "bn1")
        return self

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def _cifar(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(conv: str = "adder", num_classes: int = 10, **kw) -> ResNet:
        return ResNet(BasicBlock, (n, n, n), num_classes, conv=conv, stem="cifar", **kw)

    return build


resnet8 = register_model("resnet8", (3, 32, 32), 10)(_cifar(8))
resnet20 = register_model("resnet20", (3, 32, 32), 10)(_cifar(20))
resnet32 = register_model("resnet32", (3, 32, 32), 10)(_cifar(32))


@register_model("resnet18", (3, 224, 224), 1000)
def resnet18(conv: str = "adder", num_classes: int = 1000, **kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, conv=conv, stem="imagenet", **kw)


@register_model("resnet50", (3, 224, 224), 1000)
def resnet50(conv: str = "adder", num_classes: int = 1000, **kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, conv=conv, stem="imagenet", **kw)
