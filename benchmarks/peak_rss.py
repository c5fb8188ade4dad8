"""Peak resident memory of this process on Linux, for the CPU memory benchmarks.

``reset_peak()`` sets the kernel's high-water mark (VmHWM) to the current RSS; reading
``status_kb("VmHWM")`` afterwards gives the peak since then, with no sampling gap.
"""


def status_kb(key: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
