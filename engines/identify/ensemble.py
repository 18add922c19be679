"""An identification ensemble: its manifest in the repository and how its members' searches become one answer.

``<repository>/ensembles/<name>.json`` is written by training (``engines.identify.train``) and read by the
server; ``combine`` turns the members' per-person scores into the same voting and open-set decision the offline
evaluation reports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engines.identify.matching import Candidate, MatchDecision, MemberVote, decide, rank
from engines.repository import ModelNotFoundError
from engines.vision.clip_window import ClipSpec


@dataclass(frozen=True)
class Ensemble:
    name: str
    version: str
    members: tuple[str, ...]
    threshold: float
    margin: float
    spec: ClipSpec
    embedding_dim: int


@dataclass(frozen=True)
class Identification:
    decision: MatchDecision
    threshold: float
    candidates: list[Candidate]
    votes: list[MemberVote]


def manifest_path(repository: Path, name: str = "") -> Path | None:
    """Where the manifest of the ensemble ``name`` (the first one, if not named) is: ``<repository>/ensembles/
    <name>.json``; None where there is none."""
    folder = repository / "ensembles"
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if name:
        paths = [p for p in paths if p.stem == name]
        if not paths:
            raise ModelNotFoundError(f"no identification ensemble {name!r} in {folder}")
    return paths[0] if paths else None


# The training report's evaluation split: the clips the parity gate runs on (the rest are for training and, in the
# gate, calibration).
SPLIT_KEYS = ("enrol2_gallery", "test_probes", "unknown_probes")


def report_path(repository: Path, name: str) -> Path:
    """The evaluation report training wrote for ensemble ``name`` (its split: enrolment, test and unknown clips)."""
    return repository / "reports" / f"{name}.json"


def find_ensemble(repository: Path, name: str = "") -> Ensemble | None:
    """The identification ensemble manifest to serve (``<repository>/ensembles/<name>.json``), if any."""
    path = manifest_path(repository, name)
    if path is None:
        return None
    m = json.loads(path.read_text())
    return Ensemble(name=m["name"], version=m["version"], members=tuple(m["members"]),
                    threshold=float(m["threshold"]), margin=float(m["margin"]), spec=ClipSpec(**m["clip"]),
                    embedding_dim=int(m["slowfast"]["embed_dim"]))


def ensemble_version(onnx_sha256s: Sequence[str]) -> str:
    """An ensemble's version: its members' ONNX files in member order. Training writes it in the manifest; a
    collection records it, so templates are only ever compared with embeddings of the same models."""
    return hashlib.sha256("|".join(onnx_sha256s).encode()).hexdigest()[:16]


def combine(ensemble: Ensemble, member_scores: Mapping[str, Mapping[str, float]], top_k: int,
            threshold: float | None) -> Identification:
    """Per-member person scores (best template similarity) -> ranked candidates, votes and the decision."""
    names = list(ensemble.members)
    cands, votes = rank([dict(member_scores.get(n, {})) for n in names], names)
    t = ensemble.threshold if threshold is None else threshold
    decision = decide(cands[0] if cands else None, len(names), t, ensemble.margin)
    return Identification(decision, t, cands[:top_k], votes)
