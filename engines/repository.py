"""The model repository on disk: one folder per model with its ONNX file(s) and a ``metadata.json``.

Layout (like Triton's, minus its config language)::

    model_repository/
      retinaface/metadata.json   model.onnx   [model.fp16.onnx]  [engines/<cache key>/...]
      minifasnet_v2/...

The metadata is the contract between the exporter and the server: tensor names, dtypes and shapes (-1 for a
dynamic axis), the version, the sha256 of the ONNX file and of the weights it came from, and the
pre-processing facts the pipeline needs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines.atomic_write import write_atomically

METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]  # -1 marks a dynamic axis; axis 0 is the batch axis for batched models

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorMeta:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    onnx_sha256: str
    source_weights: dict[str, str] = field(default_factory=dict)  # relpath -> sha256
    preprocessing: dict[str, Any] = field(default_factory=dict)
    max_batch_size: int = 64  # the largest batch the exported graph was verified with

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMetadata:
        return cls(
            name=str(d["name"]),
            version=str(d["version"]),
            inputs=tuple(TensorMeta.from_dict(x) for x in d["inputs"]),
            outputs=tuple(TensorMeta.from_dict(x) for x in d["outputs"]),
            onnx_sha256=str(d["onnx_sha256"]),
            source_weights=dict(d.get("source_weights", {})),
            preprocessing=dict(d.get("preprocessing", {})),
            max_batch_size=int(d.get("max_batch_size", 64)),
        )


class ModelNotFoundError(LookupError):
    pass


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def onnx_path(self, name: str) -> Path:
        return self.model_dir(name) / ONNX_FILE

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / METADATA_FILE).is_file())

    def has(self, name: str) -> bool:
        return (self.model_dir(name) / METADATA_FILE).is_file() and self.onnx_path(name).is_file()

    def load(self, name: str) -> ModelMetadata:
        path = self.model_dir(name) / METADATA_FILE
        if not path.is_file():
            raise ModelNotFoundError(
                f"model {name!r} is not in the repository {self.root} (run `make models` to prepare it)"
            )
        return ModelMetadata.from_dict(json.loads(path.read_text()))

    def save(self, meta: ModelMetadata) -> None:
        """Write metadata atomically: a crash never leaves a half-written file that a server would read."""
        d = self.model_dir(meta.name)
        d.mkdir(parents=True, exist_ok=True)
        write_atomically(d / METADATA_FILE, meta.to_json())
