"""What this process holds of the machine, for the statistics: its resident memory."""

from __future__ import annotations

import os
import resource
import sys


def resident_bytes() -> int:
    """Resident memory of this process now (Linux: /proc); elsewhere its peak, the best there is."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
