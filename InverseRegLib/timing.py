"""How long this process has been running: the start-up part of a whole command's time."""
from __future__ import annotations

import os
import time

#: perf_counter when this module was first imported (the CLI imports it first thing)
IMPORTED_AT = time.perf_counter()


def seconds_since_process_start() -> float | None:
    """Seconds since the OS started this process (Linux: /proc, 10 ms resolution), or None where
    the platform does not say."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
        with open("/proc/uptime", "rb") as handle:
            uptime = float(handle.read().split()[0])
        # the command name (field 2) may hold spaces: the fields after it start at the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks since boot
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def seconds_since_import() -> float:
    """Seconds since :data:`IMPORTED_AT` (a lower bound for the process's age anywhere)."""
    return time.perf_counter() - IMPORTED_AT
