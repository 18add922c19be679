"""Which CPU this is, as the parity gates and the runtime choice name it: a CPU type (model and instruction-set
extensions) whose gate verdicts (bf16, INT8) carry over to every machine of that type, a machine class (the type and
the CPUs this process may use) whose speed measurements carry over, what its instructions allow, and how many CPUs
the thread pools are sized for."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

from engines.atomic_write import write_atomically

# Instruction-set extensions that change which kernels the runtimes pick (and so speed and bf16/INT8 numerics).
ISA_TAGS = (("avx512f", "avx512"), ("avx512_vnni", "vnni"), ("avx_vnni", "avx-vnni"), ("avx512_bf16", "bf16"),
            ("amx_bf16", "amx"))


@functools.cache
def usable_cpus() -> int:
    """The CPUs this process can keep busy: the fewest of the machine's CPUs, its affinity (a container's cpuset,
    as Kubernetes' static CPU manager gives a Guaranteed pod, or taskset) and its CPU quota rounded up (a
    container's CPU limit, cgroup v1 or v2), by joblib's container-aware count; ``LOKY_MAX_CPU_COUNT`` lowers it
    further. ``os.cpu_count()`` counts the node's CPUs: a pod limited to 2 CPUs of a 64-CPU node sized its thread
    pools and recorded its machine class for 64. A ``LOKY_MAX_CPU_COUNT`` that is not a whole number is a
    ValueError naming it (joblib's own is a bare int() error)."""
    import joblib  # here, not at the top: the Triton peer's venv imports this module for has_bf16 only

    try:
        return max(1, int(joblib.cpu_count()))
    except ValueError as exc:
        raise ValueError(f"LOKY_MAX_CPU_COUNT={os.environ.get('LOKY_MAX_CPU_COUNT', '')!r} must be a whole number "
                         f"of CPUs ({exc})") from None


@functools.cache
def cpu_type() -> str:
    """CPU model, family/model numbers and ISA extensions: what decides which kernels the runtimes pick, so what a
    parity gate's verdict holds for. A virtual machine may report a bare "AMD EPYC" for an AVX2-only host and for
    an AVX-512/BF16 one (both seen here), so the name alone is not a type. The CPU count is not part of it: the
    gates' models gave bitwise the same outputs on 1 and 2 threads (bf16, INT8 and FP32; AMX Xeon), and the gates
    never ran the served thread counts anyway (the identification gate compiles with every usable CPU, the
    liveness gate with one or two threads)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "flags") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:
                break  # the first processor's block is enough
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or "cpu"
    flags = set(fields.get("flags", "").split())
    isa = " ".join(tag for flag, tag in ISA_TAGS if flag in flags)
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
    return f"{cpu}{family}{f' [{isa}]' if isa else ''}"


@functools.cache
def machine_class() -> str:
    """The CPU type and the CPUs this process may use (``usable_cpus``): what ``auto``'s speed measurements hold
    for, since they depend on how many CPUs the threads get."""
    return f"{cpu_type()} x{usable_cpus()}"


def type_of(machine: str) -> str:
    """The CPU type of a recorded machine class or type (records before the types named the class, with its
    " x<CPUs>")."""
    head, _, count = machine.rpartition(" x")
    return head if head and count.isdigit() else machine


def is_this_type(recorded: str) -> bool:
    """Whether a recorded CPU type, or machine class, is this CPU's type (compared whole first: a type whose name
    itself ends in " x<digits>" is not cut short)."""
    return recorded == cpu_type() or type_of(recorded) == cpu_type()


@functools.cache
def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says it can do here (FP32, BF16, INT8, ...); empty without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return ()
    return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def has_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX), as OpenVINO detects it: never assumed from the model."""
    return "BF16" in cpu_capabilities()


# Part of the stamp: raised when what the gates record changes, so that ``make`` runs them again once on every
# repository (2: INT8 verdicts name their machine class, as bf16's did).
GATE_RECORD = 2


def write_stamp(path: Path) -> bool:
    """Write the CPU type (and the gates' record format) to ``path`` only if it differs, so make re-runs the gates
    only on another type of CPU or after the format changed; True if it was written. A stamp from before the types
    (the class, with its CPU count) of the same type and format stands."""
    current = f"{cpu_type()}\ngate record {GATE_RECORD}\n"
    if path.is_file():
        recorded = path.read_text().split("\n", 1)
        if len(recorded) == 2 and is_this_type(recorded[0]) and recorded[1] == f"gate record {GATE_RECORD}\n":
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, current)
    return True


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--stamp":
        sys.exit("usage: python -m engines.machine --stamp FILE")
    if write_stamp(Path(sys.argv[2])):
        print(f"CPU type: {cpu_type()} (the parity gates run for it)")
