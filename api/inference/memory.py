"""Hand memory the serving process does not use back to the operating system.

glibc keeps freed heap memory for reuse, and after the first large free it raises its mmap
threshold (up to 32 MB), so the big pixel buffers of later decodes come from the heap and stay
in the process after they are freed: the resident size only grows. `malloc_trim(0)` returns
the free pages at the top and in the middle of the heap.
https://man7.org/linux/man-pages/man3/malloc_trim.3.html

torch's CUDA build maps NVIDIA's libraries (cuBLASLt, NVRTC, nvJitLink, ...) and its own CUDA
parts into every process that imports it, and loading them leaves about 190 MB of their pages
resident even where no GPU exists and none of their code ever runs again. On such a host
`release_cuda_library_pages` unmaps those pages from the process (see its docstring for why
that is safe).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SMAPS = Path("/proc/self/smaps")
# Files of torch's GPU libraries: NVIDIA's wheels (site-packages/nvidia/...), CUDA's Python
# bindings (site-packages/cuda/...) and torch's own libtorch_cuda / libc10_cuda.
CUDA_LIBRARY = re.compile(r"/site-packages/(?:nvidia|cuda)/|/lib(?:torch_cuda|c10_cuda)[^/]*\.so")
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@cache
def _libc() -> Any | None:
    """glibc, when this process runs on it (musl and other platforms have no malloc_trim)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Return freed heap memory to the system; False where the C library cannot."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


@dataclass(frozen=True)
class MappedRegion:
    """One memory mapping of this process, from /proc/self/smaps (sizes in kB)."""

    start: int
    end: int
    perms: str
    path: str
    rss_kb: int = 0
    anonymous_kb: int = 0
    dirty_kb: int = 0


def read_mappings(smaps: str) -> list[MappedRegion]:
    """The mappings listed in the text of an smaps file."""
    mappings: list[MappedRegion] = []
    fields: dict[str, int] = {}
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            if mappings:
                mappings[-1] = _with_sizes(mappings[-1], fields)
            start, end, perms, path = header.groups()
            mappings.append(MappedRegion(int(start, 16), int(end, 16), perms, path.strip()))
            fields = {}
        elif line.endswith(" kB"):
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0])
    if mappings:
        mappings[-1] = _with_sizes(mappings[-1], fields)
    return mappings


def _with_sizes(mapping: MappedRegion, fields: dict[str, int]) -> MappedRegion:
    dirty = fields.get("Private_Dirty", 0) + fields.get("Shared_Dirty", 0)
    return replace(
        mapping, rss_kb=fields.get("Rss", 0), anonymous_kb=fields.get("Anonymous", 0), dirty_kb=dirty
    )


def releasable(mapping: MappedRegion) -> bool:
    """A resident, read-only mapping of a CUDA library file whose pages all still hold the file's bytes.

    Writable mappings are left alone, and so is any mapping with an anonymous (copy-on-write) or
    dirty page, such as the relocated data the dynamic loader made read-only again.
    """
    return (
        mapping.rss_kb > 0
        and CUDA_LIBRARY.search(mapping.path) is not None
        and "w" not in mapping.perms
        and mapping.anonymous_kb == 0
        and mapping.dirty_kb == 0
    )


def release_cuda_library_pages() -> int:
    """On a host where CUDA is not available, unmap the resident pages of torch's CUDA libraries.

    Call it once at startup, after torch is imported. Returns the bytes released (0 where CUDA is
    available, or where the platform has no /proc smaps or madvise).

    Why this is safe: only mappings `releasable` accepts are touched, so every page in them is
    an unmodified copy of its file, and MADV_DONTNEED on such a page only drops it from this
    process's page table, as the kernel's own reclaim does to clean file pages under memory
    pressure. Should any code of those libraries run later, its pages fault back in from the
    page cache or the file, byte for byte the same.
    https://man7.org/linux/man-pages/man2/madvise.2.html
    """
    libc = _libc()
    if torch.cuda.is_available() or libc is None or not SMAPS.exists() or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    released = 0
    for mapping in filter(releasable, read_mappings(SMAPS.read_text())):
        length = mapping.end - mapping.start
        if libc.madvise(ctypes.c_void_p(mapping.start), ctypes.c_size_t(length), mmap.MADV_DONTNEED) == 0:
            released += mapping.rss_kb * 1024
    log.info("released %.0f MB of CUDA library pages (CUDA is not available here)", released / 2**20)
    return released
