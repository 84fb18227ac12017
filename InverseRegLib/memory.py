"""Peak resident memory of this process, on Linux, macOS and Windows (Slicer runs on all three)."""
from __future__ import annotations

import sys


def peak_rss_mb() -> float | None:
    """The process's peak resident set size in MiB, or None where the platform does not say.

    On Linux the kernel's high-water mark of this process's own memory (``VmHWM``):
    ``ru_maxrss`` also counts the process this one was forked from, whose size exec records
    there (the Slicer module's worker, started by a Slicer of several GB, would report Slicer's
    size; a command started by a 1 GB script read 1 GB)."""
    linux = _linux_high_water_mb()
    if linux is not None:
        return linux
    try:
        import resource  # POSIX only
    except ImportError:
        return _windows_peak_working_set_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux but in bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def _linux_high_water_mb() -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _windows_peak_working_set_mb() -> float | None:
    try:
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                        ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                        ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                        ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                        ("QuotaNonPagedPoolUsage", ctypes.c_size_t), ("PagefileUsage", ctypes.c_size_t),
                        ("PeakPagefileUsage", ctypes.c_size_t)]

        counters = Counters()
        counters.cb = ctypes.sizeof(Counters)
        process = ctypes.windll.kernel32.GetCurrentProcess()
        if not ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
            return None
        return counters.PeakWorkingSetSize / 2**20
    except (AttributeError, OSError, ImportError):
        return None
