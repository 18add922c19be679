"""SlowFast video network with a normalised embedding head, for person identification from face clips.

Re-implemented from the published architecture facts (Feichtenhofer et al., SlowFast Networks for Video
Recognition, 2019): two pathways over the same clip, the
slow one seeing every alpha-th frame with many channels, the fast one every frame with 1/beta of the channels;
lateral fusions (time-strided 3D convs) from fast into slow after the stem, res2, res3 and res4; bottleneck
residual stages with the temporal kernels of the original (slow: 1,1,3,3; fast: 3 everywhere); adaptive
average pooling so any clip length and size work. The head projects the pooled features to an L2-normalised
embedding (what the server uses, for open-set search); training adds a cosine classifier on top.

The exported graph takes one input, ``clip`` [N, 3, T, H, W] with BGR values 0..255, and samples the slow
pathway inside the graph, so serving code never needs to know alpha.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SlowFastConfig:
    clip_len: int = 16
    """T: frames the fast pathway sees; the slow pathway sees T / alpha."""
    alpha: int = 4
    """Frame-rate ratio between the pathways."""
    beta_inv: int = 8
    """Channel ratio: the fast pathway has 1/beta_inv of the slow pathway's channels."""
    width: int = 64
    """Slow stem channels (64 in R50); stage widths follow as in ResNet bottlenecks (x4 expansion)."""
    depth: tuple[int, int, int, int] = (3, 4, 6, 3)
    """Bottleneck blocks in res2..res5 (R50: 3, 4, 6, 3)."""
    fusion_kernel: int = 5
    """Temporal kernel of the fast-to-slow lateral connections (5 for 4x16, 7 for 8x8)."""
    size: int = 128
    """Input height and width."""
    embed_dim: int = 128
    dropout: float = 0.3
    fps: float = 50.0
    """Frame rate the model expects; the server resamples clips to it."""
    residual_input: bool = False
    """Add 3 input channels with each frame minus the clip's temporal mean (computed in the graph). Static
    appearance and a clip's constant offset cancel out there, so motion is what those channels carry; the
    raw frames stay available, so appearance can still be used. Not in the original SlowFast."""
    residual_gain: float = 4.0

    def __post_init__(self) -> None:
        if self.clip_len % self.alpha:
            raise ValueError(f"clip_len ({self.clip_len}) must be divisible by alpha ({self.alpha})")
        if self.width % self.beta_inv:
            raise ValueError(f"width ({self.width}) must be divisible by beta_inv ({self.beta_inv})")
        if len(self.depth) != 4 or min(self.depth) < 1:
            raise ValueError(f"depth needs four stages of >= 1 block, got {self.depth}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depth"] = list(self.depth)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlowFastConfig:
        return cls(**{**d, "depth": tuple(d["depth"])})


PRESETS: dict[str, SlowFastConfig] = {
    # The paper's setting: R50, 64-frame window, alpha 4, beta 1/8, 128 px, at the datasets' 200 fps.
    "paper": SlowFastConfig(clip_len=64, alpha=4, beta_inv=8, width=64, depth=(3, 4, 6, 3), fusion_kernel=5,
                            size=128, fps=200.0),
    # The GPU default: the same network; it is what TensorRT serves.
    "gpu": SlowFastConfig(clip_len=64, alpha=4, beta_inv=8, width=64, depth=(3, 4, 6, 3), fusion_kernel=5,
                          size=128, fps=200.0),
    # Trains and serves on two CPU cores: 16 frames at 50 fps (the same 0.32 s as 64 at 200 fps), 64 px.
    "cpu": SlowFastConfig(clip_len=16, alpha=4, beta_inv=4, width=16, depth=(1, 1, 1, 1), fusion_kernel=5,
                          size=64, embed_dim=64, fps=50.0, residual_input=True),
}

# BGR mean / std of 0..255 pixels (ImageNet statistics, BGR order).
_MEAN = (0.406 * 255, 0.456 * 255, 0.485 * 255)
_STD = (0.225 * 255, 0.224 * 255, 0.229 * 255)


def _bn_relu(ch: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(ch), nn.ReLU(inplace=True)]


class Bottleneck3d(nn.Module):
    """(kt x 1 x 1) conv -> (1 x 3 x 3) conv with the spatial stride -> 1 x 1 x 1 conv, residual."""

    def __init__(self, c_in: int, c_inner: int, c_out: int, kt: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(c_in, c_inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False),
                               *_bn_relu(c_inner))
        self.b = nn.Sequential(nn.Conv3d(c_inner, c_inner, (1, 3, 3), stride=(1, stride, stride),
                                         padding=(0, 1, 1), bias=False), *_bn_relu(c_inner))
        self.c = nn.Sequential(nn.Conv3d(c_inner, c_out, 1, bias=False), nn.BatchNorm3d(c_out))
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=(1, stride, stride), bias=False),
                                          nn.BatchNorm3d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c(self.b(self.a(x))) + self.shortcut(x))


def _stage(c_in: int, c_inner: int, c_out: int, blocks: int, kt: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[
        Bottleneck3d(c_in if i == 0 else c_out, c_inner, c_out, kt, stride if i == 0 else 1) for i in range(blocks)
    ])


class Fuse(nn.Module):
    """Lateral connection: fast features, time-strided by alpha, concatenated onto the slow features."""

    def __init__(self, c_fast: int, alpha: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_fast, 2 * c_fast, (kernel, 1, 1), stride=(alpha, 1, 1), padding=(kernel // 2, 0, 0),
                              bias=False)
        self.bn = nn.BatchNorm3d(2 * c_fast)

    def forward(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        return torch.cat([slow, F.relu(self.bn(self.conv(fast)))], dim=1)


class TimeFoldedConv3d(nn.Module):
    """A ``Conv3d`` with few output channels and temporal stride 1, computed as one with ``fold`` times the output
    channels and temporal stride ``fold``: channel ``s * C + c`` of output frame ``t`` is channel ``c`` of frame
    ``t * fold + s``, its weights the original's shifted by ``s`` frames in a kernel ``fold - 1`` frames longer
    (zeros elsewhere). The same function, for inference only.

    Why: CPU convolution kernels vectorise over output channels (16 lanes a vector with AVX-512). The CPU preset's
    fast stem has 4 (6 -> 4 channels, 5x7x7): three quarters of every vector idle, and it took 70 % of a member's
    time in OpenVINO bf16 for 53 % of its multiply-adds. Folded to 16 channels it does 1.6x the multiply-adds (the
    added ones on zero weights) in 0.44x the time (bf16, one thread, batch 8, AMD EPYC Zen 4)."""

    def __init__(self, conv: nn.Conv3d, frames: int, fold: int) -> None:
        super().__init__()
        kt = conv.kernel_size[0]
        if conv.stride[0] != 1 or conv.dilation[0] != 1 or conv.groups != 1 or conv.bias is not None:
            raise ValueError("only a bias-free, ungrouped Conv3d with temporal stride and dilation 1 folds")
        out_frames = frames + 2 * int(conv.padding[0]) - kt + 1
        if fold < 2 or out_frames % fold:
            raise ValueError(f"{out_frames} output frames do not split into groups of {fold}")
        w = conv.weight.detach()
        c = w.shape[0]
        folded = torch.zeros(fold * c, w.shape[1], kt + fold - 1, *w.shape[3:], dtype=w.dtype)
        for s in range(fold):
            folded[s * c:(s + 1) * c, :, s:s + kt] = w
        self.weight = nn.Parameter(folded, requires_grad=False)
        self.fold, self.channels = fold, c
        self.stride = (fold, *conv.stride[1:])
        self.padding = tuple(int(p) for p in conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv3d(x, self.weight, stride=self.stride, padding=self.padding)
        n, _, groups, h, w = y.shape
        # [N, fold, C, T / fold, H, W] -> [N, C, T / fold, fold, H, W] -> [N, C, T, H, W]
        y = y.reshape(n, self.fold, self.channels, groups, h, w).permute(0, 2, 3, 1, 4, 5)
        return y.reshape(n, self.channels, groups * self.fold, h, w)


def fold_width(channels: int, out_frames: int, lanes: int = 16) -> int:
    """The fold that brings ``channels`` output channels up to ``lanes`` (1: none fits or none is needed)."""
    fold = lanes // channels if channels < lanes else 1
    while fold > 1 and out_frames % fold:
        fold //= 2
    return fold


class SlowFast(nn.Module):
    def __init__(self, cfg: SlowFastConfig, num_classes: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        w, b = cfg.width, cfg.beta_inv
        wf = w // b
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1, 1), persistent=False)
        c_in = 6 if cfg.residual_input else 3
        self.slow_stem = nn.Sequential(nn.Conv3d(c_in, w, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3),
                                                 bias=False), *_bn_relu(w))
        self.fast_stem = nn.Sequential(nn.Conv3d(c_in, wf, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3),
                                                 bias=False), *_bn_relu(wf))
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.fuse = nn.ModuleList([Fuse(wf, cfg.alpha, cfg.fusion_kernel)])
        slow_kt, fast_kt = (1, 1, 3, 3), (3, 3, 3, 3)
        strides = (1, 2, 2, 2)
        self.slow_stages = nn.ModuleList()
        self.fast_stages = nn.ModuleList()
        c_slow, c_fast = w + 2 * wf, wf
        for s in range(4):
            inner, out = w * 2**s, 4 * w * 2**s
            self.slow_stages.append(_stage(c_slow, inner, out, cfg.depth[s], slow_kt[s], strides[s]))
            self.fast_stages.append(_stage(c_fast, inner // b, out // b, cfg.depth[s], fast_kt[s], strides[s]))
            c_slow, c_fast = out, out // b
            if s < 3:  # fusion after res2, res3, res4 (none after res5)
                self.fuse.append(Fuse(c_fast, cfg.alpha, cfg.fusion_kernel))
                c_slow += 2 * c_fast
        self.feature_dim = c_slow + c_fast
        self.dropout = nn.Dropout(cfg.dropout)
        self.embed = nn.Linear(self.feature_dim, cfg.embed_dim)
        # Cosine classifier (training only): logits = scale * cos(embedding, class centre).
        self.centres = nn.Parameter(torch.randn(num_classes, cfg.embed_dim) * 0.01) if num_classes else None
        self.scale = 16.0

    def features(self, clip: torch.Tensor) -> torch.Tensor:
        x = (clip - self.mean) / self.std
        if self.cfg.residual_input:
            x = torch.cat([x, self.cfg.residual_gain * (x - x.mean(dim=2, keepdim=True))], dim=1)
        fast = self.pool(self.fast_stem(x))
        slow = self.pool(self.slow_stem(x[:, :, :: self.cfg.alpha]))
        slow = self.fuse[0](slow, fast)
        for s in range(4):
            slow, fast = self.slow_stages[s](slow), self.fast_stages[s](fast)
            if s < 3:
                slow = self.fuse[s + 1](slow, fast)
        pooled = [F.adaptive_avg_pool3d(t, 1).flatten(1) for t in (slow, fast)]
        return torch.cat(pooled, dim=1)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """The L2-normalised embedding [N, embed_dim]."""
        return F.normalize(self.embed(self.dropout(self.features(clip))), dim=1)

    def for_inference(self) -> SlowFast:
        """A copy computing the same embeddings, with the fast stem time-folded where it has fewer than 16 output
        channels (``TimeFoldedConv3d``): what is exported for serving. Training keeps the plain convolution."""
        model = copy.deepcopy(self).eval()
        conv = model.fast_stem[0]
        assert isinstance(conv, nn.Conv3d)
        fold = fold_width(conv.out_channels, self.cfg.clip_len)
        if fold > 1:
            model.fast_stem[0] = TimeFoldedConv3d(conv, self.cfg.clip_len, fold)
        return model

    def logits(self, embedding: torch.Tensor, labels: torch.Tensor | None = None, margin: float = 0.2
               ) -> torch.Tensor:
        """Cosine-classifier logits with an additive margin on the true class (CosFace), for training."""
        if self.centres is None:
            raise RuntimeError("this SlowFast was built without a classifier head")
        cos = embedding @ F.normalize(self.centres, dim=1).t()
        if labels is not None and margin:
            cos = cos - margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * cos


def count_macs(cfg: SlowFastConfig) -> int:
    """Multiply-adds of one clip (convolutions and the projection), counted with forward hooks."""
    model = SlowFast(cfg).eval()
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv3d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.kernel_size[2] * mod.in_channels // mod.groups
            total += int(out.numel() * k)
        elif isinstance(mod, nn.Linear):
            total += int(out.numel() * mod.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv3d | nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, 3, cfg.clip_len, cfg.size, cfg.size))
    for h in handles:
        h.remove()
    return total


@dataclass(frozen=True)
class TrainingConfig:
    """How one ensemble member is trained (the paper varies solver and hyper-parameters across members)."""

    optimizer: str = "adam"  # "adam" | "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 30
    batch_size: int = 16
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
