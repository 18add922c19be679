"""Synthetic micro-expression clips, written in the CASME II layout with a CASME II-style annotation file.

No micro-expression dataset may be used here, so the project makes its own: a face image (a real photo when
given, else a drawn face) animated by a smooth local displacement field, one "action unit" per identity (or
two), with identity-specific region, direction, amplitude and timing (onset, rise, hold, decay), plus per-clip
jitter, sensor noise, small global shifts and per-session lighting. Three kinds of sets:

- ``motion``: every identity has the same appearance; only the movement pattern identifies.
- ``appearance``: identities differ in appearance (tint, brightness, face width); movements are drawn afresh
  for every clip from one shared distribution, so motion carries no identity.
- ``both``: identity-specific appearance and motion.

Layout: ``<root>/CASME2_RAW/subNN/EP<session>_<clip>/img<frame>.jpg`` (absolute frame numbers) and
``<root>/CASME2-coding.csv`` with the CASME II columns (Subject, Filename, OnsetFrame, ApexFrame, OffsetFrame,
Action Units, Estimated Emotion), plus a ``synthetic.json`` recording the generator's parameters.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from engines.weights import sha256_file

# Anchor points of facial regions, as fractions of the face box (x, y).
REGIONS: dict[str, tuple[float, float]] = {
    "left_brow": (0.30, 0.22), "right_brow": (0.70, 0.22), "left_eye": (0.30, 0.38), "right_eye": (0.70, 0.38),
    "nose": (0.50, 0.55), "left_mouth": (0.33, 0.76), "right_mouth": (0.67, 0.76), "chin": (0.50, 0.92),
}


@dataclass(frozen=True)
class ActionUnit:
    region: str
    dx: float  # displacement direction (unit vector)
    dy: float
    amplitude: float  # peak displacement, fraction of face width
    radius: float  # fraction of face width
    onset_s: float
    rise_s: float
    hold_s: float
    decay_s: float

    def profile(self, t: float) -> float:
        """Activation in [0, 1] at time t (s): smooth rise, hold, smooth decay."""
        if t < self.onset_s:
            return 0.0
        t -= self.onset_s
        if t < self.rise_s:
            return 0.5 - 0.5 * math.cos(math.pi * t / self.rise_s)
        t -= self.rise_s
        if t < self.hold_s:
            return 1.0
        t -= self.hold_s
        if t < self.decay_s:
            return 0.5 + 0.5 * math.cos(math.pi * t / self.decay_s)
        return 0.0

    @property
    def apex_s(self) -> float:
        return self.onset_s + self.rise_s + self.hold_s / 2

    @property
    def offset_s(self) -> float:
        return self.onset_s + self.rise_s + self.hold_s + self.decay_s


@dataclass(frozen=True)
class Appearance:
    gains: tuple[float, float, float]  # BGR
    brightness: float
    width_scale: float


NEUTRAL = Appearance((1.0, 1.0, 1.0), 0.0, 1.0)


@dataclass(frozen=True)
class SyntheticConfig:
    identities: int = 20
    sessions: int = 2
    clips_per_session: int = 6
    fps: float = 200.0
    duration_s: float = 0.4
    kind: str = "motion"  # motion | appearance | both
    width: int = 180
    height: int = 240
    seed: int = 0
    units_per_identity: int = 2
    jpeg_quality: int = 92


def random_unit(rng: np.random.Generator, region: str | None = None) -> ActionUnit:
    angle = rng.uniform(0, 2 * math.pi)
    return ActionUnit(
        region=region or str(rng.choice(list(REGIONS))),
        dx=math.cos(angle), dy=math.sin(angle),
        amplitude=rng.uniform(0.03, 0.06), radius=rng.uniform(0.09, 0.15),
        onset_s=rng.uniform(0.04, 0.10), rise_s=rng.uniform(0.04, 0.10),
        hold_s=rng.uniform(0.0, 0.06), decay_s=rng.uniform(0.05, 0.12),
    )


def jitter_unit(u: ActionUnit, rng: np.random.Generator) -> ActionUnit:
    """Clip-to-clip variation of one person's movement: amplitude and timing wobble, region stays."""
    return ActionUnit(
        region=u.region, dx=u.dx, dy=u.dy, amplitude=u.amplitude * rng.uniform(0.85, 1.15), radius=u.radius,
        onset_s=max(0.02, u.onset_s + rng.normal(0, 0.01)), rise_s=u.rise_s * rng.uniform(0.9, 1.1),
        hold_s=max(0.0, u.hold_s + rng.normal(0, 0.005)), decay_s=u.decay_s * rng.uniform(0.9, 1.1),
    )


def random_appearance(rng: np.random.Generator) -> Appearance:
    g = rng.uniform(0.75, 1.25, size=3)
    return Appearance((float(g[0]), float(g[1]), float(g[2])), float(rng.uniform(-25, 25)),
                      float(rng.uniform(0.88, 1.12)))


def drawn_face(width: int, height: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A plain drawn face on a grey background (used when no photo is given)."""
    img = np.full((height, width, 3), 90, np.uint8)
    cx, cy, fw, fh = width // 2, height // 2, int(width * 0.55), int(height * 0.5)
    cv2.ellipse(img, (cx, cy), (fw // 2, fh // 2), 0, 0, 360, (140, 170, 215), -1)
    for sx in (-1, 1):
        ex = cx + sx * fw // 5
        cv2.ellipse(img, (ex, cy - fh // 8), (fw // 10, fh // 22), 0, 0, 360, (250, 250, 250), -1)
        cv2.circle(img, (ex, cy - fh // 8), fh // 30, (40, 30, 30), -1)
        cv2.line(img, (ex - fw // 9, cy - fh // 4), (ex + fw // 9, cy - fh // 4), (50, 60, 80), 3)
    cv2.line(img, (cx, cy - fh // 12), (cx - fw // 20, cy + fh // 10), (100, 120, 170), 2)
    cv2.ellipse(img, (cx, cy + fh // 4), (fw // 6, fh // 20), 0, 0, 180, (60, 60, 150), 3)
    rng = np.random.default_rng(123)  # skin texture so motion is visible everywhere on the face
    img = np.clip(img.astype(np.float32) + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, (cx - fw // 2, cy - fh // 2, fw, fh)


def load_base(path: Path | None, width: int, height: int, face_box: tuple[int, int, int, int] | None
              ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    if path is None:
        return drawn_face(width, height)
    from engines.vision.imaging import ImageLimits, decode_image

    img = decode_image(path.read_bytes(), ImageLimits()).bgr
    sy, sx = height / img.shape[0], width / img.shape[1]
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    if face_box is None:
        raise ValueError("a base photo needs its face box (x, y, w, h) in the photo's upright pixels")
    x, y, w, h = face_box
    return img, (int(x * sx), int(y * sy), int(w * sx), int(h * sy))


def render_clip(base: np.ndarray, face: tuple[int, int, int, int], units: list[ActionUnit], look: Appearance,
                n_frames: int, fps: float, rng: np.random.Generator, shift: tuple[float, float],
                light: float) -> list[np.ndarray]:
    h, w = base.shape[:2]
    fx, fy, fw, fh = face
    img = base.astype(np.float32)
    if look.width_scale != 1.0:  # face width: stretch horizontally about the face centre
        m = np.asarray([[look.width_scale, 0, (1 - look.width_scale) * (fx + fw / 2)], [0, 1, 0]], np.float32)
        img = np.asarray(cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT), np.float32)
    img = img * np.asarray(look.gains, np.float32) + look.brightness + light
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    fields = []
    for u in units:
        rx, ry = REGIONS[u.region]
        cx, cy = fx + rx * fw, fy + ry * fh
        g = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * (u.radius * fw) ** 2))
        fields.append((u, g * u.amplitude * fw))
    frames = []
    for i in range(n_frames):
        t = i / fps
        mx = xs - shift[0]
        my = ys - shift[1]
        for u, g in fields:
            a = u.profile(t)
            if a:
                mx = mx - a * u.dx * g
                my = my - a * u.dy * g
        frame = np.asarray(cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), np.float32)
        frame += rng.normal(0, 2.0, frame.shape).astype(np.float32)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def _render_identity(args: tuple[Path, SyntheticConfig, np.ndarray, tuple[int, int, int, int], int,
                                 list[ActionUnit], Appearance]) -> list[dict[str, object]]:
    root, cfg, base, face, pid, units, look = args
    rng = np.random.default_rng([cfg.seed, pid])  # per identity: the same clips whatever the process count
    n_frames = round(cfg.duration_s * cfg.fps)
    subject = f"sub{pid:02d}"
    rows: list[dict[str, object]] = []
    for session in range(1, cfg.sessions + 1):
        light = float(rng.uniform(-12, 12))  # per-session lighting
        for k in range(1, cfg.clips_per_session + 1):
            if cfg.kind == "appearance":  # motion drawn afresh: it carries no identity
                clip_units = [random_unit(rng) for _ in range(cfg.units_per_identity)]
            else:
                clip_units = [jitter_unit(u, rng) for u in units]
            shift = (float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3)))
            frames = render_clip(base, face, clip_units, look, n_frames, cfg.fps, rng, shift, light)
            name = f"EP{session:02d}_{k:02d}"
            folder = root / "CASME2_RAW" / subject / name
            folder.mkdir(parents=True, exist_ok=True)
            first = int(rng.integers(1, 200))  # absolute frame numbers, as in CASME II
            for i, frame in enumerate(frames):
                cv2.imwrite(str(folder / f"img{first + i}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
            lead = min(clip_units, key=lambda u: u.onset_s)
            apex = first + min(n_frames - 1, round(max(u.apex_s for u in clip_units) * cfg.fps))
            offset = min(first + n_frames - 1, first + int(max(u.offset_s for u in clip_units) * cfg.fps))
            rows.append({
                "Subject": f"{pid:02d}", "Filename": name, "OnsetFrame": first + int(lead.onset_s * cfg.fps),
                "ApexFrame": apex, "OffsetFrame": offset, "Action Units": "+".join(u.region for u in clip_units),
                "Estimated Emotion": "synthetic",
            })
    return rows


def detect_face_box(image: Path, detector_onnx: Path) -> tuple[int, int, int, int]:
    """The face box of a photo, found with the served detector (so no box needs to be typed in)."""
    from engines.identify.preprocess import OnnxDetector
    from engines.vision.imaging import ImageLimits, decode_image

    box = OnnxDetector(detector_onnx).best_box(decode_image(image.read_bytes(), ImageLimits()).bgr, 0.6)
    if box is None:
        raise ValueError(f"{image}: no face found; pass --face-box")
    return box


def generate(root: Path, cfg: SyntheticConfig, base_image: Path | None = None,
             face_box: tuple[int, int, int, int] | None = None, workers: int = 2) -> Path:
    """Write the clips and the annotation file; return the annotation path."""
    from concurrent.futures import ProcessPoolExecutor

    rng = np.random.default_rng(cfg.seed)
    base, face = load_base(base_image, cfg.width, cfg.height, face_box)
    people = []
    for _ in range(cfg.identities):
        regions = rng.choice(list(REGIONS), size=cfg.units_per_identity, replace=False)
        units = [random_unit(rng, str(r)) for r in regions]
        look = random_appearance(rng) if cfg.kind in ("appearance", "both") else NEUTRAL
        people.append((units, look))
    jobs = [(root, cfg, base, face, pid, units, look) for pid, (units, look) in enumerate(people, start=1)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_identity, jobs))
    else:
        parts = [_render_identity(j) for j in jobs]
    rows = [r for part in parts for r in part]
    annotation = root / "CASME2-coding.csv"
    with annotation.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # The photo's sha256 and face box with the settings make the set reproducible elsewhere (the generator is
    # seeded): a pod regenerates it from them to run the identification gate (engines/identify/gate_set.py).
    meta = {"config": asdict(cfg), "base_image": str(base_image) if base_image else None,
            "base_image_sha256": sha256_file(base_image) if base_image else None,
            "face_box": list(face_box) if face_box else None,
            "identities": [{"subject": f"{i:02d}", "units": [asdict(u) for u in us], "appearance": asdict(lk)}
                           for i, (us, lk) in enumerate(people, start=1)]}
    (root / "synthetic.json").write_text(json.dumps(meta, indent=1))
    return annotation


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--kind", choices=["motion", "appearance", "both"], default="motion")
    p.add_argument("--identities", type=int, default=20)
    p.add_argument("--sessions", type=int, default=2)
    p.add_argument("--clips-per-session", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-image", type=Path, help="a face photo to animate (else a drawn face)")
    p.add_argument("--face-box", type=int, nargs=4, metavar=("X", "Y", "W", "H"),
                   help="the face box in the photo's upright pixels (default: found with --detector)")
    p.add_argument("--detector", type=Path, default=Path("model_repository/retinaface/model.onnx"))
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    cfg = SyntheticConfig(identities=a.identities, sessions=a.sessions, clips_per_session=a.clips_per_session,
                          kind=a.kind, seed=a.seed)
    box = tuple(a.face_box) if a.face_box else None
    if a.base_image is not None and box is None:
        box = detect_face_box(a.base_image, a.detector)
    tmp = a.root.with_name(a.root.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    generate(tmp, cfg, a.base_image, box, a.workers)  # type: ignore[arg-type]
    tmp.rename(a.root)  # the dataset appears whole or not at all
    print(a.root / "CASME2-coding.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
