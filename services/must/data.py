"""Unlabeled image sources for MUST: safe decoding, folder scanning, a dataset and a resumable sampler."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Formats PIL may sniff. Restricting them keeps exotic decoders (EPS shells out to Ghostscript) out of reach
# of untrusted uploads. PIL's JPEG opener also handles multi-picture (MPO) JPEGs.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")

MAX_EXAMPLES_PER_REASON = 5
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# Modes Image.reduce works on directly (a palette image is reduced after conversion to RGB).
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})


@dataclass
class SkipReport:
    """Counts of skipped files by reason, with a few example paths for each reason."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: Path | str) -> None:
        """Record one skipped file."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES_PER_REASON:
            kept.append(str(path))

    @property
    def total(self) -> int:
        """Total number of skipped files."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "total": self.total,
            "counts": dict(self.counts),
            "examples": {reason: list(paths) for reason, paths in self.examples.items()},
        }


class ImageLoadError(Exception):
    """An image could not be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


def _reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """An integer downscale that keeps the shorter side at least twice `min_side` (1: none)."""
    if not min_side:
        return 1
    return max(1, min(size) // (2 * min_side))


def decode_image(
    data: bytes,
    *,
    max_bytes: int = 50_000_000,
    max_pixels: int = 50_000_000,
    min_side: int | None = None,
) -> Image.Image:
    """Decode untrusted bytes into a fully loaded RGB image, or raise ImageLoadError.

    With `min_side` (the size the image is about to be resized to), an image whose shorter side
    is at least four times larger is decoded smaller, to about twice `min_side`: JPEG by
    decoding at a fraction of its size (`draft`, DCT scaling: the full image is never in memory),
    other formats by an integer box reduction right after decoding. Resizing from twice the final
    size gives the same result to within rounding, and memory per image stays bounded by the
    image's own size once, not by every image of a request at full size at the same time.
    """
    return load_image(open_image(data, max_bytes=max_bytes), max_pixels=max_pixels, min_side=min_side)


def open_image(data: bytes, *, max_bytes: int = 50_000_000) -> Image.Image:
    """An image read from untrusted bytes up to its header (size and format known, nothing decoded)."""
    if len(data) > max_bytes:
        raise ImageLoadError("too_large", f"{len(data)} bytes > {max_bytes}")
    with _image_errors():
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)


def load_image(img: Image.Image, *, max_pixels: int = 50_000_000, min_side: int | None = None) -> Image.Image:
    """Decode an `open_image` into an RGB image (see `decode_image`), or raise ImageLoadError."""
    check_pixels(img, max_pixels)
    width, height = img.size
    with _image_errors():
        factor = _reduce_factor(img.size, min_side)
        if factor > 1 and img.format == "JPEG":
            img.draft("RGB", (width // factor, height // factor))
        img.load()
        return _reduced(img, _reduce_factor(img.size, min_side))


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """ImageLoadError("too_many_pixels") for an `open_image` larger than `max_pixels`."""
    width, height = img.size
    if width * height > max_pixels:
        raise ImageLoadError("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")


@contextmanager
def _image_errors() -> Iterator[None]:
    """PIL's failures as ImageLoadError; a decompression bomb is refused before any decoding starts."""
    # PIL reports decompression bombs as a warning first; escalate it so no huge decode ever starts.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError("too_many_pixels", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageLoadError("not_an_image", str(exc)) from exc
        except Exception as exc:  # decoders raise many exception types on corrupt input
            raise ImageLoadError("unreadable", f"{type(exc).__name__}: {exc}") from exc


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """The RGB image reduced `factor` times (before the conversion where the mode allows it)."""
    if factor <= 1:
        return _to_rgb(img)
    if img.mode in _REDUCIBLE_MODES:
        return _to_rgb(img.reduce(factor))
    return _to_rgb(img).reduce(factor)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return _wide_gray_to_rgb(img)
    if img.mode in ("P", "PA") and "transparency" in img.info:
        # Going through RGBA avoids PIL's warning about byte-encoded palette transparency.
        img = img.convert("RGBA")
    return img.convert("RGB")


def _wide_gray_to_rgb(img: Image.Image) -> Image.Image:
    """Rescale 16/32-bit or float grayscale to 8 bits (PIL's convert clips everything above 255)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode in _SIXTEEN_BIT_MODES or (arr.size and arr.max() > 255):
        arr = arr / 257.0
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _list_files(root: Path) -> list[Path]:
    """All non-hidden regular files under root, in sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        found.extend(base / name for name in filenames if not name.startswith("."))
    return sorted(p for p in found if p.is_file())


def _read_and_check(path: Path, max_bytes: int, max_pixels: int) -> None:
    """Raise ImageLoadError if the file at path is not a usable image."""
    try:
        # Checking the size first avoids reading a huge file into memory just to reject it.
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageLoadError("too_large", f"{size} bytes > {max_bytes}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageLoadError("unreadable", str(exc)) from exc
    decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)


def scan_folder(
    root: Path,
    *,
    max_images: int | None = None,
    validate: bool = True,
    max_bytes: int = 50_000_000,
    max_pixels: int = 50_000_000,
) -> tuple[list[Path], SkipReport]:
    """Recursively list usable images under root in sorted order, reporting what was skipped and why."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder is not a directory: {root}")
    images: list[Path] = []
    report = SkipReport()
    for path in _list_files(root):
        if max_images is not None and len(images) >= max_images:
            break
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            report.add("not_an_image_extension", path)
            continue
        if validate:
            try:
                _read_and_check(path, max_bytes, max_pixels)
            except ImageLoadError as exc:
                report.add(exc.reason, path)
                continue
        images.append(path)
    return images, report


class ImageListDataset(torch.utils.data.Dataset):
    """Images yielded as (transform(image), index); a file that broke after scanning is skipped."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], Any]) -> None:
        self.paths = list(paths)
        self.transform = transform
        # Per process: with DataLoader workers each worker keeps its own copy.
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        n = len(self.paths)
        last_error: ImageLoadError | None = None
        for offset in range(n):
            j = (i + offset) % n
            if offset and j in self.failed:
                continue
            try:
                img = decode_image(self._read(j))
            except ImageLoadError as exc:
                self.failed.add(j)
                last_error = exc
                continue
            return self.transform(img), j
        raise ImageLoadError("no_readable_images", f"no readable image from index {i}: {last_error}")

    def _read(self, j: int) -> bytes:
        """Raw bytes of image j."""
        try:
            return self.paths[j].read_bytes()
        except OSError as exc:
            raise ImageLoadError("unreadable", str(exc)) from exc


def mix_seed(seed: int, position: int) -> int:
    """A per-position seed that does not collide across runs with nearby seeds."""
    return (seed * 0x9E3779B1 + position * 0x85EBCA77 + 0x632BE59B) % (2**31 - 1)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Endless, seeded, exactly resumable sampler: epoch e is randperm(num_items) seeded with seed + e."""

    def __init__(self, num_items: int, seed: int, drop_last_batch_size: int | None = None) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if drop_last_batch_size is not None and not 0 < drop_last_batch_size <= num_items:
            raise ValueError(f"drop_last_batch_size must be in [1, {num_items}], got {drop_last_batch_size}")
        self.num_items = num_items
        self.seed = seed
        self.drop_last_batch_size = drop_last_batch_size
        self.epoch = 0
        self.index = 0
        self._initial = (0, 0)
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    @property
    def epoch_length(self) -> int:
        """Items yielded per epoch: all of them, or whole batches only when drop_last_batch_size is set."""
        if self.drop_last_batch_size is None:
            return self.num_items
        return self.num_items - self.num_items % self.drop_last_batch_size

    def permutation(self, epoch: int) -> list[int]:
        """The item order of one epoch (truncated to epoch_length)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator)[: self.epoch_length].tolist()

    def __iter__(self) -> Iterator[int]:
        while True:
            if self._perm_epoch != self.epoch:
                self._perm = self.permutation(self.epoch)
                self._perm_epoch = self.epoch
            item = self._perm[self.index]
            self.index += 1
            if self.index == self.epoch_length:
                self.epoch, self.index = self.epoch + 1, 0
            yield item

    def state_dict(self) -> dict[str, Any]:
        """Current position (which runs ahead of training when a DataLoader prefetches)."""
        return self._state(self.epoch, self.index)

    def state_after(self, consumed: int) -> dict[str, Any]:
        """State of a fresh sampler after `consumed` items from this sampler's initial position."""
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        epoch, index = self._initial
        total = index + consumed
        return self._state(epoch + total // self.epoch_length, total % self.epoch_length)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a state; it also becomes the new initial position for state_after."""
        for key in ("num_items", "seed", "drop_last_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler {key} mismatch: saved {state[key]}, current {getattr(self, key)}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.epoch_length:
            raise ValueError(f"invalid sampler position epoch={epoch} index={index}")
        self.epoch, self.index = epoch, index
        self._initial = (epoch, index)

    def _state(self, epoch: int, index: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "index": index,
            "seed": self.seed,
            "num_items": self.num_items,
            "drop_last_batch_size": self.drop_last_batch_size,
        }


@dataclass(frozen=True)
class Labelled:
    """Few-label mode's labelled images and their class indices (in the job's class order)."""

    paths: list[Path]
    labels: list[int]

    def summary(self, num_classes: int) -> dict[str, Any]:
        counts = torch.bincount(torch.as_tensor(self.labels), minlength=num_classes).tolist()
        return {"images": len(self.paths), "per_class": counts}


class LabelledBatches:
    """A seeded batch of labelled images per training step (weak view), drawn by the step alone,
    so that a resumed run sees the batches the interrupted one would have."""

    def __init__(
        self, labelled: Labelled, transform: Callable[[Image.Image], torch.Tensor], size: int, seed: int
    ) -> None:
        self.labelled, self.transform = labelled, transform
        self.size, self.seed = min(size, len(labelled.paths)), seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed + 2, step))
        chosen = torch.randperm(len(self.labelled.paths), generator=gen)[: self.size].tolist()
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(mix_seed(self.seed + 3, step))  # the weak view's random crop
        try:
            pixels = [self.transform(decode_image(self.labelled.paths[i].read_bytes())) for i in chosen]
        finally:
            torch.random.set_rng_state(torch_state)
        return torch.stack(pixels), torch.tensor([self.labelled.labels[i] for i in chosen])
