"""Keep the inference runtimes' own usage telemetry on the host.

Both CPU runtimes report usage to their vendors by default, from the process that loads them: ``import openvino``
sends a Google Analytics event (openvino-telemetry, opt-out), and ONNX Runtime 1.29+ on Linux uploads session and
model events to Microsoft's 1DS collector and keeps a device identifier under ``~/.cache``. A biometric service
makes no outbound connection its operator did not configure, so both are switched off before either runtime loads,
through the switches their vendors provide: ``ORT_DISABLE_TELEMETRY=1`` (read when ONNX Runtime initialises; an
operator's own setting is kept), and OpenVINO's fallback for a missing telemetry package (its converter imports
``openvino_telemetry`` in a ``try`` and uses its own no-op stub on ImportError; a ``None`` entry in
``sys.modules`` makes that import fail).
"""

from __future__ import annotations

import os
import sys


def keep_local() -> None:
    """Switch both runtimes' telemetry off; call before importing either (``engines/__init__`` does)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
