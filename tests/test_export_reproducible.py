"""The same weights export to the same ONNX bytes wherever the code is checked out: the file's sha256 is the model's
identity (an ensemble's version, which collections are bound to; the gates' verdicts; compiled caches)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import torch

from engines.export import STACK_TRACE, export_onnx

SOURCE = '''
import torch


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))
'''


def export_from(checkout: Path) -> bytes:
    """The module's source in a checkout of its own, imported from there; its weights seeded; the ONNX bytes."""
    checkout.mkdir()
    (checkout / "netmod.py").write_text(SOURCE)
    spec = importlib.util.spec_from_file_location("netmod", checkout / "netmod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    out = checkout / "model.onnx"
    export_onnx(module.Net(), torch.rand(2, 3, 16, 16), out, "x", ["y"])
    return out.read_bytes()


def test_the_same_weights_export_to_the_same_bytes_from_two_checkouts(tmp_path: Path) -> None:
    first, second = export_from(tmp_path / "one"), export_from(tmp_path / "two")
    assert b"netmod" in first  # the module is named in the graph's metadata, as it should be
    assert str(tmp_path).encode() not in first + second  # but no path of a checkout is
    assert first == second
    assert not any(p.key == STACK_TRACE for n in onnx.load_from_string(first).graph.node for p in n.metadata_props)
