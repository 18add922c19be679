"""The bad-input corpus: hostile and malformed requests, each with the status it must get.

Extend it by adding a ``Case`` to ``cases()``: a name, the RPC, a function building the request from the
``Materials`` (images, clips and videos made once per run), and the acceptable status codes. The runner
(tests/test_bad_input_corpus.py) sends each case to a real server, checks the status, then checks that the server
still gives a correct answer, and bounds the server's peak memory over the whole corpus.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
import numpy as np
from PIL import Image

from facegate.v1 import common_pb2, identification_pb2, liveness_pb2
from inference import grpc_service_pb2 as oip
from tests.images import mjpeg_avi, png_chunk, with_extra_scans

Code = grpc.StatusCode
INVALID = (Code.INVALID_ARGUMENT,)


@dataclass
class Materials:
    """Inputs the cases share, made once: real images from the samples, frames of a synthetic clip, videos."""

    folder: Path
    live: bytes  # a sample photo (JPEG)
    frames: list[bytes]  # one synthetic clip's JPEG frames
    collection: str = "corpus"
    enrolled: str = "alice"
    cache: dict[str, bytes] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], bytes]) -> bytes:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def flat_image(width: int, height: int, fmt: str, **params: object) -> bytes:
    """A real image of one colour: tiny when encoded, ``width*height*3`` bytes when decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buf, fmt, **params)
    return buf.getvalue()


def progressive(jpeg: bytes) -> bytes:
    """The same picture re-encoded as a progressive JPEG."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, "JPEG", quality=90, progressive=True)
    return buf.getvalue()


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG with its SOF0/SOF2 dimensions rewritten."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("no SOF marker")


def video(path: Path, frames: list[np.ndarray], fourcc: str = "MJPG", repeat: int = 1) -> bytes:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), 30.0, (w, h))
    for _ in range(repeat):
        for f in frames:
            writer.write(f)
    writer.release()
    return path.read_bytes()


def decoded_frames(m: Materials) -> list[np.ndarray]:
    out = [cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR) for f in m.frames]
    return [f for f in out if f is not None]


# --- request builders ----------------------------------------------------------------------------------------


def live(data: bytes, **kw: object) -> liveness_pb2.CheckLivenessRequest:
    return liveness_pb2.CheckLivenessRequest(image=common_pb2.Image(data=data), **kw)  # type: ignore[arg-type]


def clip(frames: list[bytes] | None = None, fps: float = 200.0, **kw: object) -> identification_pb2.Clip:
    return identification_pb2.Clip(frames=[common_pb2.Image(data=f) for f in frames or []], fps=fps,
                                   **kw)  # type: ignore[arg-type]


def ident(m: Materials, c: identification_pb2.Clip | None, **kw: object) -> identification_pb2.IdentifyFromClipRequest:
    req = identification_pb2.IdentifyFromClipRequest(collection=str(kw.pop("collection", m.collection)), **kw)  # type: ignore[arg-type]
    if c is not None:
        req.clip.CopyFrom(c)
    return req


def enrol(m: Materials, clips: list[identification_pb2.Clip], **kw: object) -> identification_pb2.EnrollFromClipRequest:
    kw.setdefault("person_id", "corpus-person")
    return identification_pb2.EnrollFromClipRequest(collection=m.collection, clips=clips, **kw)  # type: ignore[arg-type]


def infer(model: str, shape: list[int], data: bytes = b"", dtype: str = "FP32", name: str = "input"
          ) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(model_name=model, inputs=[oip.ModelInferRequest.InferInputTensor(
        name=name, datatype=dtype, shape=shape)], raw_input_contents=[data])


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str  # CheckLiveness | IdentifyFromClip | EnrollFromClip | DeletePerson | ListPersons | ModelInfer
    build: Callable[[Materials], object]
    codes: tuple[grpc.StatusCode, ...] = INVALID
    timeout_s: float = 60.0


def cases(tmp: Path) -> list[Case]:
    big = 17 * 1024 * 1024
    def tiny_jpeg(m: Materials) -> bytes:
        return m.once("tiny", lambda: flat_image(64, 64, "JPEG"))
    return [
        # --- CheckLiveness ---
        Case("image empty", "CheckLiveness", lambda m: live(b"")),
        Case("image random bytes", "CheckLiveness", lambda m: live(np.random.default_rng(0).bytes(5000))),
        Case("image text", "CheckLiveness", lambda m: live(b"hello, I am not an image")),
        Case("image truncated JPEG", "CheckLiveness", lambda m: live(m.live[: len(m.live) // 2])),
        Case("image JPEG markers only", "CheckLiveness", lambda m: live(b"\xff\xd8\xff\xd9")),
        Case("image 1x1 PNG", "CheckLiveness", lambda m: live(flat_image(1, 1, "PNG"))),
        Case("image 16x16 PNG", "CheckLiveness", lambda m: live(flat_image(16, 16, "PNG"))),
        Case("image GIF", "CheckLiveness", lambda m: live(flat_image(64, 64, "GIF"))),
        Case("image BMP", "CheckLiveness", lambda m: live(flat_image(64, 64, "BMP"))),
        Case("PNG bomb header 30000x30000", "CheckLiveness", lambda m: live(png_declaring(30000, 30000))),
        Case("PNG header 7000x7000 (49 MP)", "CheckLiveness", lambda m: live(png_declaring(7000, 7000))),
        Case("PNG bomb real 7000x7000 flat", "CheckLiveness",
             lambda m: live(m.once("png7k", lambda: flat_image(7000, 7000, "PNG", compress_level=9)))),
        Case("WebP bomb real 7000x7000 flat", "CheckLiveness",
             lambda m: live(m.once("webp7k", lambda: flat_image(7000, 7000, "WEBP", lossless=True)))),
        Case("JPEG header 60000x60000", "CheckLiveness", lambda m: live(jpeg_declaring(m.live, 60000, 60000))),
        # 1.5 MB that OpenCV takes ~2 s to decode: 100,000 one-code scans, each a pass over every block.
        Case("progressive JPEG of 100k scans", "CheckLiveness",
             lambda m: live(m.once("scans", lambda: with_extra_scans(progressive(m.live), 100_000)))),
        Case("image over max_bytes (9 MB)", "CheckLiveness", lambda m: live(m.live + b"\0" * (9 << 20))),
        Case("message over 16 MiB", "CheckLiveness", lambda m: live(b"\0" * big), (Code.RESOURCE_EXHAUSTED,)),
        Case("threshold -0.1", "CheckLiveness", lambda m: live(m.live, threshold=-0.1)),
        Case("threshold 1.5", "CheckLiveness", lambda m: live(m.live, threshold=1.5)),
        Case("threshold NaN", "CheckLiveness", lambda m: live(m.live, threshold=float("nan"))),
        Case("request_id 200 chars", "CheckLiveness", lambda m: live(m.live, request_id="r" * 200)),
        Case("request_id control chars", "CheckLiveness", lambda m: live(m.live, request_id="a\x00b")),
        Case("deadline 1 ms", "CheckLiveness", lambda m: live(m.live), (Code.DEADLINE_EXCEEDED,), 0.001),
        # --- IdentifyFromClip ---
        Case("clip missing", "IdentifyFromClip", lambda m: ident(m, None)),
        Case("clip no frames", "IdentifyFromClip", lambda m: ident(m, clip([]))),
        Case("clip one frame", "IdentifyFromClip", lambda m: ident(m, clip(m.frames[:1]))),
        Case("fps 0", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, fps=0))),
        Case("fps -1", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, fps=-1))),
        Case("fps NaN", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, fps=float("nan")))),
        Case("fps inf", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, fps=float("inf")))),
        Case("fps 1e12", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, fps=1e12))),
        Case("fps 1e12 with apex hint", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, fps=1e12, apex_frame=3))),
        Case("fps 1001", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, fps=1001))),
        Case("401 frames", "IdentifyFromClip", lambda m: ident(m, clip([m.frames[0]] * 401))),
        Case("1400 frames", "IdentifyFromClip", lambda m: ident(m, clip([tiny_jpeg(m)] * 1400))),
        Case("frames of mixed sizes", "IdentifyFromClip",
             lambda m: ident(m, clip([*m.frames[:5], tiny_jpeg(m), *m.frames[5:10]]))),
        Case("undecodable frame", "IdentifyFromClip",
             lambda m: ident(m, clip([*m.frames[:5], b"garbage", *m.frames[5:10]]))),
        Case("truncated frame", "IdentifyFromClip",
             lambda m: ident(m, clip([*m.frames[:5], m.frames[5][:200], *m.frames[6:10]]))),
        Case("300 flat 2000x2000 PNG frames", "IdentifyFromClip",
             lambda m: ident(m, clip([m.once("png2k", lambda: flat_image(2000, 2000, "PNG"))] * 300))),
        Case("frame progressive JPEG of 10k scans", "IdentifyFromClip",
             lambda m: ident(m, clip([*m.frames[:5], with_extra_scans(progressive(m.frames[5]), 10_000),
                                      *m.frames[6:10]]))),
        Case("frame PNG bomb header", "IdentifyFromClip",
             lambda m: ident(m, clip([*m.frames[:5], png_declaring(30000, 30000)]))),
        Case("frame WebP 7000x7000", "IdentifyFromClip",
             lambda m: ident(m, clip([m.once("webp7k", lambda: flat_image(7000, 7000, "WEBP", lossless=True))] * 4))),
        Case("apex -1", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, apex_frame=-1))),
        Case("apex past the end", "IdentifyFromClip", lambda m: ident(m, clip(m.frames, apex_frame=5000))),
        Case("top_k 101", "IdentifyFromClip", lambda m: ident(m, clip(m.frames), top_k=101)),
        Case("top_k -1", "IdentifyFromClip", lambda m: ident(m, clip(m.frames), top_k=-1)),
        Case("threshold 2", "IdentifyFromClip", lambda m: ident(m, clip(m.frames), threshold=2.0)),
        Case("threshold NaN (identify)", "IdentifyFromClip",
             lambda m: ident(m, clip(m.frames), threshold=float("nan"))),
        Case("collection unknown", "IdentifyFromClip", lambda m: ident(m, clip(m.frames), collection="nope"),
             (Code.NOT_FOUND,)),
        Case("collection empty", "IdentifyFromClip", lambda m: ident(m, clip(m.frames), collection="")),
        Case("collection 200 chars", "IdentifyFromClip", lambda m: ident(m, clip(m.frames), collection="c" * 200)),
        Case("video random bytes", "IdentifyFromClip",
             lambda m: ident(m, clip(video=np.random.default_rng(1).bytes(10000)))),
        Case("video and frames", "IdentifyFromClip",
             lambda m: ident(m, clip(m.frames, video=m.once("avi", lambda: video(tmp / "c.avi", decoded_frames(m)))))),
        Case("video one frame", "IdentifyFromClip",
             lambda m: ident(m, clip(video=video(tmp / "one.avi", decoded_frames(m)[:1])))),
        Case("video corrupt mid-stream", "IdentifyFromClip",
             lambda m: ident(m, clip(video=m.once("avi", lambda: video(tmp / "c.avi", decoded_frames(m)))[:30000])),
             (Code.OK, Code.INVALID_ARGUMENT)),
        Case("video never ends (5000 frames)", "IdentifyFromClip",
             lambda m: ident(m, clip(video=video(tmp / "long.avi", [np.full((48, 64, 3), 90, np.uint8)],
                                                 repeat=5000)))),
        Case("video 4K x 400 frames", "IdentifyFromClip",
             # MPEG-4 part 2: a static 4K frame compresses to a few MB (MJPEG would exceed the message limit).
             lambda m: ident(m, clip(video=video(tmp / "4k.mp4", [np.full((2160, 3840, 3), 90, np.uint8)],
                                                 fourcc="mp4v", repeat=400)))),
        Case("video frame progressive JPEG of 10k scans", "IdentifyFromClip",
             # Motion JPEG: the frames are JPEG files byte for byte, the last one the 10k-scan frame above.
             lambda m: ident(m, clip(video=mjpeg_avi(
                 [*m.frames[:5], with_extra_scans(progressive(m.frames[5]), 10_000)],
                 *Image.open(io.BytesIO(m.frames[0])).size)))),
        Case("video codec not allowed (PNG in AVI)", "IdentifyFromClip",
             lambda m: ident(m, clip(video=video(tmp / "png.avi", decoded_frames(m)[:10], fourcc="MPNG")))),
        # --- EnrollFromClip ---
        Case("enrol no clips", "EnrollFromClip", lambda m: enrol(m, [])),
        Case("enrol 10k clips", "EnrollFromClip", lambda m: enrol(m, [clip([])] * 10_000)),
        Case("enrol 17 clips", "EnrollFromClip", lambda m: enrol(m, [clip(m.frames)] * 17)),
        Case("enrol 1400 frames", "EnrollFromClip", lambda m: enrol(m, [clip([tiny_jpeg(m)] * 1400)])),
        Case("enrol pixels over the request budget", "EnrollFromClip",
             lambda m: enrol(m, [clip([m.once("vga", lambda: flat_image(640, 480, "JPEG"))] * 300)] * 2)),
        Case("display name 10 MB", "EnrollFromClip",
             lambda m: enrol(m, [clip(m.frames)], display_name="n" * (10 << 20))),
        Case("display name 257 chars", "EnrollFromClip", lambda m: enrol(m, [clip(m.frames)], display_name="n" * 257)),
        Case("display name control chars", "EnrollFromClip",
             lambda m: enrol(m, [clip(m.frames)], display_name="a\x00\x1b[2J")),
        Case("person_id empty", "EnrollFromClip", lambda m: enrol(m, [clip(m.frames)], person_id="")),
        Case("person_id 129 chars", "EnrollFromClip", lambda m: enrol(m, [clip(m.frames)], person_id="p" * 129)),
        Case("mode unknown", "EnrollFromClip", lambda m: enrol(m, [clip(m.frames)], mode=7)),
        Case("request_key 200 chars", "EnrollFromClip", lambda m: enrol(m, [clip(m.frames)], request_key="k" * 200)),
        Case("enrol fps 1e12", "EnrollFromClip", lambda m: enrol(m, [clip(m.frames, fps=1e12)])),
        # Other frames than the enrolment's: the same request again would be a retry (answered as replayed).
        Case("create over an existing person", "EnrollFromClip",
             lambda m: enrol(m, [clip(m.frames[::-1])], person_id=m.enrolled), (Code.ALREADY_EXISTS,)),
        Case("append to a missing person", "EnrollFromClip",
             lambda m: enrol(m, [clip(m.frames)], person_id="ghost", mode=identification_pb2.ENROLL_MODE_APPEND),
             (Code.NOT_FOUND,)),
        Case("delete a missing person", "DeletePerson",
             lambda m: identification_pb2.DeletePersonRequest(collection=m.collection, person_id="ghost"),
             (Code.NOT_FOUND,)),
        Case("list page_size 5000", "ListPersons",
             lambda m: identification_pb2.ListPersonsRequest(collection=m.collection, page_size=5000)),
        # --- ModelInfer ---
        Case("infer huge declared batch", "ModelInfer", lambda m: infer("minifasnet_v2", [1_000_000, 3, 80, 80])),
        Case("infer huge declared detector size", "ModelInfer",
             lambda m: infer("retinaface", [1, 3, 100_000, 100_000])),
        Case("infer negative dims", "ModelInfer", lambda m: infer("minifasnet_v2", [-1, 3, 80, 80])),
        Case("infer wrong rank", "ModelInfer", lambda m: infer("minifasnet_v2", [1, 3, 80])),
        Case("infer unknown model", "ModelInfer", lambda m: infer("nope", [1, 3, 80, 80]), (Code.NOT_FOUND,)),
        Case("infer wrong datatype", "ModelInfer",
             lambda m: infer("minifasnet_v2", [1, 3, 80, 80], b"\0" * (3 * 80 * 80 * 8), "FP64")),
        Case("infer raw length mismatch", "ModelInfer", lambda m: infer("minifasnet_v2", [1, 3, 80, 80], b"\0" * 12)),
        Case("infer batch over max", "ModelInfer",
             lambda m: infer("minifasnet_v2", [64, 3, 80, 80], b"\0" * (64 * 3 * 80 * 80 * 4))),
        Case("infer unknown input name", "ModelInfer",
             lambda m: infer("minifasnet_v2", [1, 3, 80, 80], b"\0" * (3 * 80 * 80 * 4), name="x")),
    ]
