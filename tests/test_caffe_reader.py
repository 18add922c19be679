"""The Caffe prototxt parser and the caffemodel wire-format reader, on hand-made inputs."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from engines.caffe import parse_prototxt, read_caffemodel


def test_prototxt_nested_repeated_and_typed_values() -> None:
    text = '''
    name: "net"  # a comment
    layer {
      name: "conv1" type: "Convolution" bottom: "data" top: "c1"
      convolution_param { num_output: 8 bias_term: false kernel_size: 3 }
    }
    layer { name: "out" type: "DetectionOutput" detection_output_param { code_type: CENTER_SIZE
      nms_param { nms_threshold: 0.3 } } }
    '''
    net = parse_prototxt(text)
    assert net["name"] == ["net"]
    first, second = net["layer"]
    conv = first["convolution_param"][0]
    assert conv["num_output"] == [8] and conv["bias_term"] == [False] and conv["kernel_size"] == [3]
    det = second["detection_output_param"][0]
    assert det["code_type"] == ["CENTER_SIZE"]
    assert det["nms_param"][0]["nms_threshold"] == [0.3]


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def test_caffemodel_blobs_with_shape_and_packed_floats(tmp_path: Path) -> None:
    data = np.arange(6, dtype="<f4")
    shape = _field(1, _varint(2) + _varint(3))  # BlobShape.dim packed
    blob = _field(7, shape) + _field(5, data.tobytes())
    layer = _field(1, b"conv1") + _field(2, b"Convolution") + _field(7, blob)
    path = tmp_path / "m.caffemodel"
    path.write_bytes(_field(100, layer) + _field(100, _field(1, b"relu")))  # a layer without blobs is skipped
    weights = read_caffemodel(path)
    assert list(weights) == ["conv1"]
    np.testing.assert_array_equal(weights["conv1"][0], data.reshape(2, 3))
    assert struct.calcsize("<f") == 4
