"""The CPU a benchmark ran on, for its JSON header (``/proc/cpuinfo``'s model name on Linux)."""

import platform
from pathlib import Path


def cpu_name() -> str:
    """The first ``model name`` of ``/proc/cpuinfo``, else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
