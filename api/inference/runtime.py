"""Process-wide settings that keep a CPU serving process fast; an explicitly set environment variable wins.

glibc's allocator is left at its defaults on purpose. Fixing its mmap threshold low, so that
every freed activation went back to the system, made each forward map its buffers afresh: one
page fault per 4 KiB page, about 20 ms of kernel time per ViT-B-32 image on the 2-core
development VM and a forward a quarter slower (bench.inference). The default lets a batch's
activations be reused by the next forward; with batches of 16 on a CPU that costs about
40 MB of peak memory.
"""

from __future__ import annotations

import os
import sys


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
