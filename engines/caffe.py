"""Read a Caffe network without Caffe: the prototxt structure and the caffemodel weights.

The detector the liveness models were trained with ships as Caffe files. OpenCV 5 dropped its Caffe
importer, so the project reads both files itself: the prototxt is protobuf text format (parsed here into
plain dicts) and the caffemodel is a binary ``NetParameter`` whose few fields we need are decoded straight
from the protobuf wire format. Field numbers are those of Caffe's public ``caffe.proto``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# --- prototxt (protobuf text format) -------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|([A-Za-z_][A-Za-z0-9_]*)\s*:?\s*|("(?:[^"\\]|\\.)*")|([{}])|([^\s{}#"]+))')

TextMessage = dict[str, list[Any]]


def parse_prototxt(text: str) -> TextMessage:
    """Parse protobuf text format into nested dicts; every field maps to the list of its values."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"prototxt: cannot parse near offset {pos}: {text[pos:pos + 40]!r}")
        pos = m.end()
        comment, name, string, brace, scalar = m.groups()
        if comment:
            continue
        if name is not None:
            tokens.append(("name", name))
        elif string is not None:
            tokens.append(("string", string[1:-1]))
        elif brace is not None:
            tokens.append((brace, brace))
        elif scalar is not None:
            tokens.append(("value", scalar))

    def convert(raw: str) -> Any:
        for kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                pass
        if raw in ("true", "false"):
            return raw == "true"
        return raw  # enum identifiers stay strings

    def message(i: int) -> tuple[TextMessage, int]:
        out: TextMessage = {}
        while i < len(tokens):
            kind, val = tokens[i]
            if kind == "}":
                return out, i + 1
            if kind != "name":
                raise ValueError(f"prototxt: expected a field name, got {val!r}")
            nxt_kind, nxt_val = tokens[i + 1]
            if nxt_kind == "{":
                sub, i = message(i + 2)
                out.setdefault(val, []).append(sub)
            elif nxt_kind == "value":
                out.setdefault(val, []).append(convert(nxt_val))
                i += 2
            elif nxt_kind == "string":
                out.setdefault(val, []).append(nxt_val)
                i += 2
            elif nxt_kind == "name":  # bare identifiers: booleans and enum values
                out.setdefault(val, []).append(convert(nxt_val))
                i += 2
            else:
                raise ValueError(f"prototxt: unexpected {nxt_val!r} after {val!r}")
        return out, i

    result, _ = message(0)
    return result


# --- caffemodel (binary NetParameter) ------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Split one protobuf message into (field number, wire type, raw value)."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        val: Any
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"caffemodel: unsupported wire type {wire}")
        out.append((num, wire, val))
    return out


def _blob(buf: bytes) -> np.ndarray:
    # BlobProto: num=1 channels=2 height=3 width=4 data=5 (packed float) shape=7 (BlobShape: dim=1 int64)
    legacy = [0, 0, 0, 0]
    dims: list[int] = []
    chunks: list[np.ndarray] = []
    for num, wire, val in _fields(buf):
        if num in (1, 2, 3, 4):
            legacy[num - 1] = val
        elif num == 5:
            if wire == 2:
                chunks.append(np.frombuffer(val, dtype="<f4"))
            else:
                chunks.append(np.frombuffer(val, dtype="<f4", count=1))
        elif num == 7:
            for snum, swire, sval in _fields(val):
                if snum != 1:
                    continue
                if swire == 2:
                    p = 0
                    while p < len(sval):
                        d, p = _varint(sval, p)
                        dims.append(d)
                else:
                    dims.append(sval)
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    shape = dims or [d for d in legacy if d] or [data.size]
    return data.astype(np.float32).reshape(shape)


def read_caffemodel(path: Path) -> dict[str, list[np.ndarray]]:
    """Return each layer's blobs by layer name (NetParameter.layer=100, LayerParameter name=1 blobs=7)."""
    weights: dict[str, list[np.ndarray]] = {}
    for num, _, val in _fields(path.read_bytes()):
        if num != 100:
            continue
        name = ""
        blobs: list[np.ndarray] = []
        for lnum, _, lval in _fields(val):
            if lnum == 1:
                name = lval.decode()
            elif lnum == 7:
                blobs.append(_blob(lval))
        if blobs:
            weights[name] = blobs
    if not weights:
        raise ValueError(f"{path}: no layer weights found (not a Caffe NetParameter with 'layer' entries)")
    return weights


@dataclass
class CaffeLayer:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: TextMessage = field(default_factory=dict)

    def param(self, section: str, key: str, default: Any = None) -> Any:
        sec = self.params.get(section)
        if not sec:
            return default
        values = sec[0].get(key)
        return values[0] if values else default

    def params_list(self, section: str, key: str) -> list[Any]:
        sec = self.params.get(section)
        return list(sec[0].get(key, [])) if sec else []


def read_prototxt_layers(path: Path) -> list[CaffeLayer]:
    net = parse_prototxt(path.read_text())
    layers = []
    for raw in net.get("layer", []):
        params = {k: v for k, v in raw.items() if k not in ("name", "type", "bottom", "top")}
        layers.append(
            CaffeLayer(
                name=raw["name"][0],
                type=raw["type"][0],
                bottoms=list(raw.get("bottom", [])),
                tops=list(raw.get("top", [])),
                params=params,
            )
        )
    return layers
