"""Readers for CASME II, SAMM and SMIC in their published layouts and annotation files.

Each yields ``ClipRecord``s: subject, clip name, recording session, the frame files in temporal order, the
capture frame rate, and the apex as an index into those frames (None when the annotation has none or an
unusable one, in which case the preprocessing spots it from motion).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass(frozen=True)
class ClipRecord:
    dataset: str
    subject: str
    clip: str
    session: str
    frames: tuple[Path, ...]
    fps: float
    apex: int | None  # index into frames
    onset: int | None = None
    offset: int | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.subject}/{self.clip}"


def _frame_number(path: Path) -> int:
    nums = re.findall(r"\d+", path.stem)
    if not nums:
        raise ValueError(f"{path}: no frame number in the file name")
    return int(nums[-1])


def sorted_frames(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES]
    return sorted(files, key=_frame_number)


def read_table(path: Path, required: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of a CSV or XLSX annotation file as dicts, finding the header row after any preamble."""
    required = [r.lower() for r in required]
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook  # optional: only needed for the published .xlsx files

        sheet = load_workbook(path, read_only=True, data_only=True).worksheets[0]
        rows = [["" if c is None else str(c).strip() for c in row] for row in sheet.iter_rows(values_only=True)]
    else:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f)]
    for i, row in enumerate(rows):
        lowered = [c.lower() for c in row]
        if all(any(r == c for c in lowered) for r in required):
            header = row
            return [dict(zip(header, r, strict=False)) for r in rows[i + 1:] if any(r)]
    raise ValueError(f"{path}: no header row with the columns {list(required)}")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(float(str(value).strip()))
    except ValueError:
        return None


def _index_of(frames: list[Path], frame_no: int | None) -> int | None:
    if frame_no is None:
        return None
    numbers = [_frame_number(p) for p in frames]
    if frame_no in numbers:
        return numbers.index(frame_no)
    return None


def read_casme2(root: Path, annotation: Path | None = None, fps: float = 200.0) -> list[ClipRecord]:
    """``CASME2_RAW/subNN/EPxx_yy/imgN.jpg`` (or ``Cropped/subNN/EP.../reg_imgN.jpg``) and the coding sheet."""
    annotation = annotation or next(iter(sorted(root.glob("CASME2-coding*.*"))), None)
    if annotation is None:
        raise FileNotFoundError(f"{root}: no CASME2-coding annotation file")
    base = root / "CASME2_RAW" if (root / "CASME2_RAW").is_dir() else root / "Cropped"
    records = []
    for row in read_table(annotation, ["Subject", "Filename", "ApexFrame"]):
        subject = f"sub{int(float(row['Subject'])):02d}" if str(row["Subject"]).strip().isdigit() else row["Subject"]
        folder = base / subject / row["Filename"]
        if not folder.is_dir():
            continue
        frames = sorted_frames(folder)
        episode = re.match(r"EP(\d+)", row["Filename"])
        records.append(ClipRecord(
            dataset="casme2", subject=subject, clip=row["Filename"], session=episode.group(1) if episode else "0",
            frames=tuple(frames), fps=fps, apex=_index_of(frames, _int_or_none(row["ApexFrame"])),
            onset=_index_of(frames, _int_or_none(row.get("OnsetFrame"))),
            offset=_index_of(frames, _int_or_none(row.get("OffsetFrame"))),
        ))
    return records


def read_samm(root: Path, annotation: Path | None = None, fps: float = 200.0) -> list[ClipRecord]:
    """``SAMM/006/006_1_2/006_05562.jpg`` and ``SAMM_Micro_FACS_Codes_v2.xlsx`` (header after a preamble)."""
    annotation = annotation or next(iter(sorted(root.glob("SAMM_Micro_FACS_Codes*.*"))), None)
    if annotation is None:
        raise FileNotFoundError(f"{root}: no SAMM_Micro_FACS_Codes annotation file")
    base = root / "SAMM" if (root / "SAMM").is_dir() else root
    records = []
    for row in read_table(annotation, ["Subject", "Filename", "Apex Frame"]):
        subject = f"{int(float(row['Subject'])):03d}"
        folder = base / subject / row["Filename"]
        if not folder.is_dir():
            continue
        frames = sorted_frames(folder)
        onset = _index_of(frames, _int_or_none(row.get("Onset Frame")))
        offset = _index_of(frames, _int_or_none(row.get("Offset Frame")))
        apex = _index_of(frames, _int_or_none(row["Apex Frame"]))
        if apex is not None and onset is not None and offset is not None and not onset <= apex <= offset:
            apex = None  # some rows put the apex outside onset..offset: spot it instead
        parts = row["Filename"].split("_")
        records.append(ClipRecord("samm", subject, row["Filename"], parts[1] if len(parts) > 2 else "0",
                                  tuple(frames), fps, apex, onset, offset))
    return records


def read_smic(root: Path, annotation: Path | None = None, fps: float = 100.0, modality: str = "HS"
              ) -> list[ClipRecord]:
    """``SMIC_all_cropped/HS/sN/micro/{negative,positive,surprise}/<clip>/reg_image*.bmp``.

    No apex is annotated: with the SMIC-E annotation (OnsetF, OffsetF) the apex is (onset + offset) // 2;
    otherwise it is left to the motion spotter."""
    base = root / "SMIC_all_cropped" / modality
    if not base.is_dir():
        base = root / modality
    spans: dict[str, tuple[int | None, int | None]] = {}
    annotation = annotation or next(iter(sorted(root.glob("SMIC-*annotation*.csv"))), None)
    if annotation is not None:
        for row in read_table(annotation, ["Filename", "OnsetF", "OffsetF"]):
            spans[Path(row["Filename"]).name] = (_int_or_none(row["OnsetF"]), _int_or_none(row["OffsetF"]))
    records = []
    for folder in sorted(base.glob("s*/micro/*/*")):
        if not folder.is_dir():
            continue
        frames = sorted_frames(folder)
        onset, offset = (_index_of(frames, n) for n in spans.get(folder.name, (None, None)))
        apex = (onset + offset) // 2 if onset is not None and offset is not None else None
        records.append(ClipRecord("smic", folder.parts[-4], folder.name, "0", tuple(frames), fps, apex, onset,
                                  offset))
    return records


READERS = {"casme2": read_casme2, "samm": read_samm, "smic": read_smic}
