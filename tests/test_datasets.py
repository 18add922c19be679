"""The synthetic generator writes the CASME II layout; the readers parse CASME II, SAMM and SMIC layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from engines.identify.datasets import read_casme2, read_samm, read_smic
from engines.identify.synthetic import SyntheticConfig, generate


def test_synthetic_clips_in_casme2_layout_with_annotation(tmp_path: Path) -> None:
    cfg = SyntheticConfig(identities=2, sessions=2, clips_per_session=1, duration_s=0.3, width=90, height=120)
    annotation = generate(tmp_path, cfg, workers=1)
    records = read_casme2(tmp_path, annotation)
    assert len(records) == 4
    r = records[0]
    assert r.subject == "sub01" and r.clip == "EP01_01" and r.session == "01" and r.fps == 200
    assert len(r.frames) == 60 and r.apex is not None and 0 <= r.apex < 60
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    assert meta["config"]["kind"] == "motion" and len(meta["identities"]) == 2
    # Motion only: every identity shares one appearance.
    assert meta["identities"][0]["appearance"] == meta["identities"][1]["appearance"]
    # The face moves at the apex, not at the start: compare smoothed differences (noise averages out).
    import cv2

    f = [np.asarray(Image.open(p).convert("L"), np.float32) for p in r.frames]

    def moved(i: int) -> float:
        return float(cv2.GaussianBlur(np.abs(f[i] - f[0]), (0, 0), 3).max())

    assert moved(r.apex) > 2 * moved(1)


def _frames(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True)
    for n in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / n)


def test_samm_reader_finds_the_header_after_a_preamble_and_drops_bad_apexes(tmp_path: Path) -> None:
    _frames(tmp_path / "SAMM" / "006" / "006_1_2", [f"006_{n:05d}.jpg" for n in range(5560, 5570)])
    _frames(tmp_path / "SAMM" / "007" / "007_3_1", [f"007_{n:04d}.jpg" for n in range(100, 110)])
    with (tmp_path / "SAMM_Micro_FACS_Codes_v2.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["SAMM micro-movement codes"], [""], ["Subject", "Filename", "Inducement Code", "Onset Frame",
                     "Apex Frame", "Offset Frame"], ["6", "006_1_2", "1", "5561", "5565", "5568"],
                     ["7", "007_3_1", "3", "101", "109", "105"]])
    records = read_samm(tmp_path, tmp_path / "SAMM_Micro_FACS_Codes_v2.csv")
    assert [(r.subject, r.session, r.apex) for r in records] == [("006", "1", 5), ("007", "3", None)]


def test_smic_reader_takes_the_apex_from_onset_and_offset(tmp_path: Path) -> None:
    _frames(tmp_path / "SMIC_all_cropped" / "HS" / "s3" / "micro" / "positive" / "s3_po_05",
            [f"reg_image{n}.bmp" for n in range(1, 21)])
    with (tmp_path / "SMIC-HS-E_annotation.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["Filename", "OnsetF", "OffsetF"], ["s3_po_05", "5", "15"]])
    (r,) = read_smic(tmp_path)
    assert r.subject == "s3" and r.fps == 100 and r.apex == (4 + 14) // 2


def test_casme2_coding_sheet_as_xlsx_with_a_slash_apex(tmp_path: Path) -> None:
    from openpyxl import Workbook

    _frames(tmp_path / "CASME2_RAW" / "sub01" / "EP02_01f", [f"img{n}.jpg" for n in range(46, 60)])
    _frames(tmp_path / "CASME2_RAW" / "sub01" / "EP03_02", [f"img{n}.jpg" for n in range(10, 20)])
    wb = Workbook()
    ws = wb.active
    ws.append(["Subject", "Filename", "", "OnsetFrame", "ApexFrame", "OffsetFrame", "", "Action Units",
               "Estimated Emotion"])
    ws.append([1, "EP02_01f", None, 46, 52, 58, None, "4", "disgust"])
    ws.append([1, "EP03_02", None, 10, "/", 19, None, "12", "happiness"])
    wb.save(tmp_path / "CASME2-coding-20140508.xlsx")
    records = read_casme2(tmp_path)
    assert [(r.clip, r.session, r.apex, r.onset) for r in records] == [
        ("EP02_01f", "02", 6, 0), ("EP03_02", "03", None, 0)]  # "/" as apex: spotted from motion instead
