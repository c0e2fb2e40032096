"""Hand memory freed after a large decode back to the operating system.

glibc keeps freed heap memory for reuse, and after the first large free it raises its mmap
threshold (up to 32 MB), so the big pixel buffers of later decodes come from the heap and stay
in the process after they are freed: the resident size only grows. `malloc_trim(0)` returns
the free pages at the top and in the middle of the heap.
https://man7.org/linux/man-pages/man3/malloc_trim.3.html
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache
from typing import Any

log = logging.getLogger(__name__)


@cache
def _libc() -> Any | None:
    """glibc, when this process runs on it (musl and other platforms have no malloc_trim)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Return freed heap memory to the system; False where the C library cannot."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))
