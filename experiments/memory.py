"""Process-wide allocator setting for the command-line entry points (``lightning``, ``mammospn``).

glibc gives freed blocks above its (adaptive, ~1-3 MB here) trim threshold back to the kernel and faults
them in again at the next allocation. A RAT-SPN EM step at batch 64 allocates a few MB of temporaries,
so every step paid hundreds of page faults (a third of `make bench`'s SPN time was kernel time).
Fixed thresholds keep freed memory in the process for reuse. Library code never calls this: it changes
the whole process, so only the entry points (and the benchmarks that measure them) opt in.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap (reused) instead of a fresh mmap
MMAP_THRESHOLD = 64 << 20
#: free memory at the top of the heap is handed back to the kernel only beyond this
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds; False (and nothing changed) without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
