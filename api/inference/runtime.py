"""Process-wide settings that keep a CPU serving process fast and small.

Both are defaults: an explicitly set environment variable wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD -3).
_M_MMAP_THRESHOLD = -3
# Buffers at least this large are mapped on their own and returned to the system when freed.
MMAP_THRESHOLD_BYTES = 1 << 20


def prefer_passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning; must run before torch is first imported.

    torch's intra-op threads spin between parallel regions by default. When anything else needs
    a core (the event loop, image decoding, other processes) a spinning thread holds it while
    its partner waits at the next barrier: on a busy 2-core machine that made a ViT-B-32
    forward about 8 times slower (bench.inference). Sleeping costs microseconds per region.
    https://gcc.gnu.org/onlinedocs/libgomp/OMP_005fWAIT_005fPOLICY.html
    """
    if "torch" in sys.modules:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def prefer_huge_pages() -> None:
    """Back torch's large CPU buffers with transparent huge pages; must run before torch is imported.

    `return_large_buffers` hands every freed activation back to the system, so each forward
    maps its buffers afresh, one page fault per 4 KiB page: on this 2-core VM about 20 ms of
    kernel time per ViT-B-32 image at batch 32 (bench.inference). torch's THP_MEM_ALLOC_ENABLE
    aligns buffers of 2 MiB and more and asks for huge pages (madvise), which halves that kernel
    time without keeping anything resident. Where the kernel has THP off it changes nothing.
    """
    if "torch" in sys.modules:
        return
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def return_large_buffers() -> None:
    """Fix glibc's mmap threshold so large freed tensors go back to the system (Linux/glibc only).

    glibc raises the threshold after each large free, up to 32 MB, so a batch's activations end
    up in the heap and stay resident after the forward: about 130 MB more peak memory for
    ViT-B-32 at batch 32. Setting it explicitly turns that adjustment off (mallopt(3)).
    The MALLOC_MMAP_THRESHOLD_ environment variable, when set, is left to decide.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        log.debug("mallopt is unavailable; leaving the allocator's defaults")
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
