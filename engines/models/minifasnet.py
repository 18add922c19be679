"""MiniFASNetV2 and MiniFASNetV1SE, re-implemented from the published architecture facts.

Module names follow the released state dicts (``conv1``, ``conv_23``, ``conv_3.model.N``, ``se_module`` ...)
so the weights load with ``strict=True``; any mismatch in the layer list fails loudly at load time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Expand widths of the residual units per stage (facts from the Silent-Face-Anti-Spoofing release).
_WIDTHS: dict[str, dict[str, list[int]]] = {
    "v2": {"conv_3": [13, 13, 13, 13], "conv_4": [231, 52, 26, 77, 26, 26], "conv_5": [26, 26]},
    "v1se": {"conv_3": [13, 26, 13, 52], "conv_4": [154, 52, 26, 52, 26, 26], "conv_5": [26, 26]},
}
_TRANSITIONS = {"conv_23": (32, 103, 64), "conv_34": (64, 231, 128), "conv_45": (128, 308, 128)}


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU per channel, or without the PReLU for the 'linear' projections."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int] = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, activation: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.prelu = nn.PReLU(c_out) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.prelu(x) if self.prelu is not None else x


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = channels // reduction
        self.fc1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.fc2 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=(2, 3), keepdim=True)
        g = torch.relu(self.bn1(self.fc1(g)))
        return x * torch.sigmoid(self.bn2(self.fc2(g)))


class Bottleneck(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride s) -> 1x1 linear project, optional SE, residual when shapes match."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, residual: bool, se: bool = False) -> None:
        super().__init__()
        self.conv = ConvBlock(c_in, mid)
        self.conv_dw = ConvBlock(mid, mid, 3, stride, 1, groups=mid)
        self.project = ConvBlock(mid, c_out, activation=False)
        self.se_module = SqueezeExcite(c_out) if se else None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        if self.se_module is not None:
            y = self.se_module(y)
        return x + y if self.residual else y


class Stage(nn.Module):
    def __init__(self, channels: int, widths: list[int], se_last: bool) -> None:
        super().__init__()
        self.model = nn.Sequential(*[
            Bottleneck(channels, w, channels, 1, residual=True, se=se_last and i == len(widths) - 1)
            for i, w in enumerate(widths)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MiniFASNet(nn.Module):
    """Input: BGR float32 [N, 3, H, W] with raw 0..255 values. Output: 3 logits (class 1 = live)."""

    def __init__(self, variant: str, height: int = 80, width: int = 80, num_classes: int = 3) -> None:
        super().__init__()
        if variant not in _WIDTHS:
            raise ValueError(f"unknown MiniFASNet variant {variant!r}; expected one of {sorted(_WIDTHS)}")
        widths = _WIDTHS[variant]
        se = variant == "v1se"
        self.conv1 = ConvBlock(3, 32, 3, 2, 1)
        self.conv2_dw = ConvBlock(32, 32, 3, 1, 1, groups=32)
        self.conv_23 = Bottleneck(*_TRANSITIONS["conv_23"], stride=2, residual=False)
        self.conv_3 = Stage(64, widths["conv_3"], se)
        self.conv_34 = Bottleneck(*_TRANSITIONS["conv_34"], stride=2, residual=False)
        self.conv_4 = Stage(128, widths["conv_4"], se)
        self.conv_45 = Bottleneck(*_TRANSITIONS["conv_45"], stride=2, residual=False)
        self.conv_5 = Stage(128, widths["conv_5"], se)
        self.conv_6_sep = ConvBlock(128, 512)
        kernel = ((height + 15) // 16, (width + 15) // 16)
        self.conv_6_dw = ConvBlock(512, 512, kernel, groups=512, activation=False)
        self.linear = nn.Linear(512, 128, bias=False)
        self.bn = nn.BatchNorm1d(128)
        self.drop = nn.Dropout(0.2)
        self.prob = nn.Linear(128, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2_dw(self.conv1(x))
        x = self.conv_3(self.conv_23(x))
        x = self.conv_4(self.conv_34(x))
        x = self.conv_5(self.conv_45(x))
        x = self.conv_6_dw(self.conv_6_sep(x))
        x = torch.flatten(x, 1)
        return self.prob(self.drop(self.bn(self.linear(x))))


def load_minifasnet(path: Path, variant: str, height: int = 80, width: int = 80) -> MiniFASNet:
    """Build the network and load a released state dict (keys prefixed ``module.``), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = MiniFASNet(variant, height, width)
    model.load_state_dict(state, strict=True)
    return model.eval()
