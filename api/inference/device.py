"""What a GPU does for serving besides the forward: decode and resize JPEGs, and run in bf16 or fp16.

On a GPU a ViT-B/32 batch takes a few milliseconds, less than decoding and resizing its images
with PIL on a few CPU cores; nvJPEG (torchvision's `decode_jpeg` on a CUDA device) and a
resize on the device take that work off the CPU. Other formats, and any JPEG nvJPEG refuses,
go through PIL as on a CPU. The image tower runs under autocast in fp16 (bf16 on request); the
head and the softmax stay in fp32 (`ImageClassifier.logits`), which keeps the probabilities
within 1e-2 of an fp32 forward (tests/api/inference/test_device.py).

torchvision is imported only here and only when a decoder is built: on a CPU server it is not
loaded at all (it brings torch._dynamo, sympy and triton, about 170 MB).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
JPEG_MAGIC = b"\xff\xd8\xff"


def autocast_dtype(device: str | torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The reduced precision a forward on `device` runs in (None: fp32).

    "auto" is fp16 on a CUDA GPU and fp32 on a CPU (where reduced precision is slower without
    AMX, and no faster with the small batches a server runs). fp16 rather than bf16: with 3
    more bits of mantissa its probabilities stay within 0.003 of fp32 on the tiny CLIPs, where
    bf16's drift up to 0.018 (64 target images each; test_device.py holds both to 1e-2 on
    fewer). CLIP towers were trained in fp16, and a batch whose fp16 logits overflow is
    run again in fp32 (`run_forward`).
    """
    kind = torch.device(device).type
    if precision == "fp32" or (precision == "auto" and kind != "cuda"):
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to `dtype` on `device`, or nothing for fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class TensorDecoder:
    """JPEG bytes to normalised pixels with torchvision's tensor operations on `device`.

    The same steps as the PIL preprocessing of a "shortest" resize mode: the shorter side
    resized to `size` (antialiased, `interpolation`), a centre crop to `size` x `size`, then
    `ToTensor` + `Normalize`. Resampling differs from PIL's by at most a few levels of 8 bits.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    device: torch.device

    @classmethod
    def for_preprocess(cls, preprocess: Any, device: str | torch.device) -> TensorDecoder | None:
        """A decoder for an open_clip-style preprocessing config, or None where it cannot follow it."""
        size = preprocess.size if isinstance(preprocess.size, int) else tuple(preprocess.size)
        if isinstance(size, tuple):
            if len(size) != 2 or size[0] != size[1]:
                return None
            size = size[0]
        if getattr(preprocess, "resize_mode", "shortest") != "shortest":
            return None
        if preprocess.interpolation not in ("bicubic", "bilinear"):
            return None
        if getattr(preprocess, "mode", "RGB") != "RGB":
            return None
        return cls(
            int(size),
            tuple(preprocess.mean),
            tuple(preprocess.std),
            preprocess.interpolation,
            torch.device(device),
        )

    def decode(self, images: Sequence[bytes]) -> torch.Tensor:
        """[B, 3, size, size] normalised float pixels on the device; raises if any image cannot be decoded."""
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        out = []
        for image in decoded:
            resized = F.resize(image, [self.size], interpolation=mode, antialias=True)
            out.append(F.center_crop(resized, [self.size, self.size]))
        pixels = torch.stack(out).to(torch.float32).div_(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        return pixels.sub_(mean).div_(std)


def is_jpeg(data: bytes) -> bool:
    """Whether bytes start like a JPEG file."""
    return data[:3] == JPEG_MAGIC
