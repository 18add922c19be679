"""The Silent-Face RetinaFace detector, rebuilt in PyTorch from its Caffe prototxt and caffemodel.

The network is interpreted layer by layer from the prototxt (so the structure is the released one, not a
transcription), with the weights read from the caffemodel. Only the part that is a plain tensor program is
built: the prior boxes and DetectionOutput (decode + NMS) run outside the network, in
``engines.vision.detection``, so the ONNX graph stays free of custom ops and keeps a dynamic batch axis.

Outputs: ``loc`` [N, P, 4] (box regression against the priors) and ``conf`` [N, P, 2] (softmax, class 1 =
face), P = priors for the input size, in the order Caffe's PriorBox layers produce them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.caffe import CaffeLayer, read_caffemodel, read_prototxt_layers

LOC_BLOB = "mbox_loc"
CONF_BLOB = "mbox_conf_softmax"


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class _Conv(nn.Module):
    def __init__(self, layer: CaffeLayer, blobs: list[np.ndarray], transpose: bool) -> None:
        super().__init__()
        p = layer.param
        weight = blobs[0]
        out_ch = int(p("convolution_param", "num_output"))
        groups = int(p("convolution_param", "group", 1))
        k = int(p("convolution_param", "kernel_size"))
        stride = int(p("convolution_param", "stride", 1))
        pad = int(p("convolution_param", "pad", 0))
        dilation = int(p("convolution_param", "dilation", 1))
        bias = bool(p("convolution_param", "bias_term", True))
        conv: nn.Module
        if transpose:
            conv = nn.ConvTranspose2d(weight.shape[0], out_ch, k, stride, pad, groups=groups, bias=bias,
                                      dilation=dilation)
        else:
            conv = nn.Conv2d(weight.shape[1] * groups, out_ch, k, stride, pad, groups=groups, bias=bias,
                             dilation=dilation)
        with torch.no_grad():
            conv.weight.copy_(_t(weight).reshape(conv.weight.shape))
            if bias:
                assert conv.bias is not None
                conv.bias.copy_(_t(blobs[1]).reshape(-1))
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Affine(nn.Module):
    """Caffe BatchNorm (stored mean/var scaled by a factor) or Scale, folded to y = x * a + b."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray) -> None:
        super().__init__()
        self.a: torch.Tensor
        self.b: torch.Tensor
        self.register_buffer("a", _t(scale).reshape(1, -1, 1, 1))
        self.register_buffer("b", _t(shift).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


def _batchnorm(layer: CaffeLayer, blobs: list[np.ndarray]) -> _Affine:
    factor = float(blobs[2].reshape(-1)[0]) if len(blobs) > 2 else 1.0
    factor = 0.0 if factor == 0 else 1.0 / factor
    mean = blobs[0].reshape(-1) * factor
    var = blobs[1].reshape(-1) * factor
    eps = float(layer.param("batch_norm_param", "eps", 1e-5))
    inv = 1.0 / np.sqrt(var + eps)
    return _Affine(inv, -mean * inv)


def _scale(layer: CaffeLayer, blobs: list[np.ndarray]) -> _Affine:
    gamma = blobs[0].reshape(-1)
    beta = blobs[1].reshape(-1) if len(blobs) > 1 else np.zeros_like(gamma)
    return _Affine(gamma, beta)


class CaffeRetinaFace(nn.Module):
    """Runs the needed prefix of the Caffe graph; returns (loc [N,P,4], conf [N,P,2])."""

    def __init__(self, prototxt: Path, caffemodel: Path) -> None:
        super().__init__()
        layers = read_prototxt_layers(prototxt)
        weights = read_caffemodel(caffemodel)
        needed = self._needed(layers, {LOC_BLOB, CONF_BLOB})
        self.plan: list[CaffeLayer] = [layer for layer in layers if layer.name in needed]
        self.mods = nn.ModuleDict()
        for layer in self.plan:
            key = self._key(layer.name)
            if layer.type in ("Convolution", "Deconvolution"):
                self.mods[key] = _Conv(layer, weights[layer.name], transpose=layer.type == "Deconvolution")
            elif layer.type == "BatchNorm":
                self.mods[key] = _batchnorm(layer, weights[layer.name])
            elif layer.type == "Scale":
                self.mods[key] = _scale(layer, weights[layer.name])
            elif layer.type not in ("ReLU", "Concat", "Crop", "Eltwise", "Flatten", "Permute", "Reshape", "Softmax"):
                raise ValueError(f"unsupported Caffe layer type {layer.type} ({layer.name})")

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    @staticmethod
    def _needed(layers: list[CaffeLayer], outputs: set[str]) -> set[str]:
        wanted = set(outputs)
        names: set[str] = set()
        for layer in reversed(layers):
            if wanted.intersection(layer.tops):
                names.add(layer.name)
                wanted.update(layer.bottoms)
        return names

    def forward(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blobs: dict[str, torch.Tensor] = {"data": data}
        for layer in self.plan:
            xs = [blobs[b] for b in layer.bottoms]
            y = self._run_layer(layer, xs)
            blobs[layer.tops[0]] = y
        loc = blobs[LOC_BLOB]
        return loc.reshape(loc.shape[0], -1, 4), blobs[CONF_BLOB]

    def _run_layer(self, layer: CaffeLayer, xs: list[torch.Tensor]) -> torch.Tensor:
        t = layer.type
        if t in ("Convolution", "Deconvolution", "BatchNorm", "Scale"):
            return self.mods[self._key(layer.name)](xs[0])
        if t == "ReLU":
            slope = float(layer.param("relu_param", "negative_slope", 0.0))
            return torch.relu(xs[0]) if slope == 0 else nn.functional.leaky_relu(xs[0], slope)
        if t == "Concat":
            return torch.cat(xs, dim=int(layer.param("concat_param", "axis", 1)))
        if t == "Crop":
            axis = int(layer.param("crop_param", "axis", 2))
            offsets = layer.params_list("crop_param", "offset") or [0]
            ref = xs[1]
            y = xs[0]
            for d in range(axis, y.dim()):
                off = int(offsets[min(d - axis, len(offsets) - 1)])
                y = y.narrow(d, off, ref.shape[d])
            return y
        if t == "Eltwise":
            op = layer.param("eltwise_param", "operation", "SUM")
            if op != "SUM":
                raise ValueError(f"Eltwise {op} is not supported")
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        if t == "Flatten":
            axis = int(layer.param("flatten_param", "axis", 1))
            return torch.flatten(xs[0], start_dim=axis)
        if t == "Permute":
            order = [int(o) for o in layer.params_list("permute_param", "order")]
            return xs[0].permute(*order)
        if t == "Reshape":
            dims = [int(d) for d in layer.params["reshape_param"][0]["shape"][0]["dim"]]
            shape = [xs[0].shape[i] if d == 0 else d for i, d in enumerate(dims)]
            return xs[0].reshape(*shape)
        if t == "Softmax":
            return torch.softmax(xs[0], dim=int(layer.param("softmax_param", "axis", 1)))
        raise ValueError(f"unsupported Caffe layer type {t}")
