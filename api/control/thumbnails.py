"""Small JPEG thumbnails of dataset images, made with PIL alone (the control API loads no torch)."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

THUMBNAIL_PIXELS = 160
JPEG_QUALITY = 80


class NotAnImage(ValueError):
    """The bytes are not an image PIL can decode within the pixel limit."""


def thumbnail_jpeg(data: bytes, *, max_pixels: int, size: int = THUMBNAIL_PIXELS) -> bytes:
    """`data` decoded, shrunk to fit `size` x `size` (aspect kept) and encoded as JPEG.

    The pixel count is checked from the header before anything is decoded, so a decompression
    bomb costs nothing; `draft` lets JPEG decode at a fraction of its size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise NotAnImage(f"{width}x{height} pixels is over the limit of {max_pixels}")
            image.draft("RGB", (size, size))
            image.thumbnail((size, size))
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, Warning) as exc:
        raise NotAnImage(f"not a readable image ({type(exc).__name__})") from exc
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
