"""Small sample architectures: a strong one (``kc_resnet``) and a weak one (``kc_tinynet``).

Both take RGB images of any size (adaptive average pooling before the classifier) and have
a mid layer with 4-D output at 1/4 of the input resolution (32x16x16 for 64x64 inputs), so a
weak and a strong network can be compared at the same shape (paper Sec. 4,
"diagnosing network representations").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity (or 1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) → (N, C_out, ⌈H/stride⌉, ⌈W/stride⌉): two convolutions plus the shortcut, then ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # out is a fresh tensor, so the in-place add and ReLU never touch x (a hooked output).
        out += self.shortcut(x)
        return self.relu(out)


class KCResNet(nn.Module):
    """Small ResNet: a stride-2 stem, then 3 stages of basic blocks (strides 1, 2, 2).

    For a ``(N, 3, 64, 64)`` input: stem -> ``(N, w0, 32, 32)``, layer1 -> ``(N, w0, 32, 32)``,
    layer2 -> ``(N, w1, 16, 16)``, layer3 -> ``(N, w2, 8, 8)``.

    Args:
        num_classes: number of outputs of the classifier.
        widths: channels of the three stages.
        blocks: basic blocks per stage.
    """

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64),
                 blocks: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if stage == 0 else 2
            layers = [BasicBlock(in_ch, width, stride)]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) → logits (N, num_classes)."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class KCTinyNet(nn.Module):
    """Weak plain CNN: three strided convs with few channels, no BatchNorm, no shortcut.

    For a ``(N, 3, 64, 64)`` input: block1 -> ``(N, 16, 32, 32)``, block2 -> ``(N, 32, 16, 16)``,
    block3 -> ``(N, 32, 8, 8)``. Each block is ``Sequential(conv, ReLU)`` with a ReLU that is
    not in place.

    Args:
        num_classes: number of outputs of the classifier.
        widths: channels of the three convs.
    """

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (16, 32, 32)) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        self.block1 = nn.Sequential(nn.Conv2d(3, widths[0], 5, 2, 2), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, 2, 1), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(widths[1], widths[2], 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) → logits (N, num_classes)."""
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.pool(x).flatten(1))


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def kc_resnet(num_classes: int) -> nn.Module:
    """The strong sample architecture: ``KCResNet`` with widths 16/32/64, one block per stage."""
    return KCResNet(num_classes)


def kc_tinynet(num_classes: int) -> nn.Module:
    """The weak sample architecture: ``KCTinyNet`` with widths 16/32/32."""
    return KCTinyNet(num_classes)


SAMPLE_ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "kc_resnet": kc_resnet,
    "kc_tinynet": kc_tinynet,
}
"""Builders ``num_classes -> nn.Module`` of the sample architectures, by name."""


@dataclass(frozen=True)
class DefaultLayer:
    """A layer worth comparing and its output shape for a 64x64 input.

    Attributes:
        name: module name (as in ``model.named_modules()``).
        shape: output shape ``(C, H, W)`` for a ``(1, 3, 64, 64)`` input.
    """

    name: str
    shape: tuple[int, int, int]


DEFAULT_LAYERS: dict[str, DefaultLayer] = {
    "kc_resnet": DefaultLayer("layer2", (32, 16, 16)),
    "kc_tinynet": DefaultLayer("block2", (32, 16, 16)),
}
"""Default layer to compare for each sample architecture (written to model cards)."""
