"""Optimisation profiles derived from a model's batcher settings and input metadata.

TensorRT tunes kernels for each profile's ``opt`` shape, so profiles follow how the batcher will actually call
the engine: batch sizes from 1 to ``max_batch_size``, ``opt`` at the largest preferred size (else the max), and
- for CUDA graphs - a set of batch buckets the runtime pads to. Every dynamic input of a model appears in every
profile (multi-input models fail to build otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class SpatialRange:
    """Bounds for dynamic non-batch axes (the detector's height and width): axis -> (min, opt, max)."""

    axes: dict[int, tuple[int, int, int]]


@dataclass(frozen=True)
class InputProfile:
    name: str
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class Profile:
    inputs: tuple[InputProfile, ...]

    def as_key(self) -> list[dict[str, object]]:
        return [{"name": i.name, "min": list(i.min), "opt": list(i.opt), "max": list(i.max)} for i in self.inputs]


def batch_buckets(max_batch_size: int, preferred: Sequence[int] = ()) -> tuple[int, ...]:
    """Powers of two up to the max, plus the max and every preferred size: the shapes CUDA graphs are made for."""
    sizes = {max_batch_size, *preferred}
    b = 1
    while b < max_batch_size:
        sizes.add(b)
        b *= 2
    return tuple(sorted(s for s in sizes if 1 <= s <= max_batch_size))


def derive_profile(inputs: Sequence[tuple[str, Shape]], max_batch_size: int, preferred: Sequence[int] = (),
                   spatial: SpatialRange | None = None) -> Profile:
    """One profile covering batch 1..max (opt = largest preferred, else max) for every input.

    ``inputs`` are (name, shape) with -1 for dynamic axes and axis 0 the batch. A dynamic non-batch axis needs a
    range in ``spatial``; a static axis is the same in min, opt and max, as TensorRT requires.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    opt_batch = max([p for p in preferred if p <= max_batch_size], default=max_batch_size)
    out = []
    for name, shape in inputs:
        lo, op, hi = [1], [opt_batch], [max_batch_size]
        for axis, dim in enumerate(shape[1:], start=1):
            if dim >= 0:
                lo.append(dim)
                op.append(dim)
                hi.append(dim)
                continue
            if spatial is None or axis not in spatial.axes:
                raise ValueError(f"input {name!r} axis {axis} is dynamic; give its (min, opt, max) range")
            a, b, c = spatial.axes[axis]
            if not 1 <= a <= b <= c:
                raise ValueError(f"input {name!r} axis {axis}: need 1 <= min <= opt <= max, got {(a, b, c)}")
            lo.append(a)
            op.append(b)
            hi.append(c)
        out.append(InputProfile(name, tuple(lo), tuple(op), tuple(hi)))
    return Profile(tuple(out))


def fits(profile: Profile, shapes: dict[str, Shape]) -> bool:
    """Whether concrete input shapes lie inside the profile (TensorRT rejects them otherwise)."""
    for p in profile.inputs:
        s = shapes.get(p.name)
        if s is None or len(s) != len(p.min):
            return False
        if any(not lo <= d <= hi for d, lo, hi in zip(s, p.min, p.max, strict=True)):
            return False
    return True
