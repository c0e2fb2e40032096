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

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from services.must.preprocess import PreprocessConfig

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def autocast_dtype(device: str | torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The reduced precision a forward on `device` runs in (None: fp32).

    "auto" is fp16 on a CUDA GPU and fp32 on a CPU (where reduced precision is slower without
    AMX, and no faster with the small batches a server runs). fp16 rather than bf16: with 3
    more bits of mantissa its probabilities stay within 0.0022 of fp32 on the tiny CLIPs, where
    bf16's drift up to 0.018 (64 target images each; test_device.py holds fp16 to 1e-2 and
    bf16 to 3e-2 on 16). CLIP towers were trained in fp16, and a batch whose fp16 logits overflow is
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
    resized to `size` (antialiased, `interpolation`) and a centre crop to `size` x `size`,
    giving 8-bit pixels that the forward normalises like PIL's (`pixels.normalize`).
    Resampling differs from PIL's by at most a few levels of 8 bits.
    """

    size: int
    interpolation: str
    device: torch.device

    @classmethod
    def for_preprocess(cls, preprocess: PreprocessConfig, device: str | torch.device) -> TensorDecoder | None:
        """A decoder for a classifier's preprocessing, or None where it cannot follow it."""
        size = preprocess.size if isinstance(preprocess.size, int) else tuple(preprocess.size)
        if isinstance(size, tuple):
            if len(size) != 2 or size[0] != size[1]:
                return None
            size = size[0]
        follows = (
            preprocess.resize_mode == "shortest"
            and preprocess.interpolation in ("bicubic", "bilinear")
            and preprocess.mode == "RGB"
        )
        return cls(int(size), preprocess.interpolation, torch.device(device)) if follows else None

    def decode(self, images: Sequence[bytes]) -> torch.Tensor:
        """[B, 3, size, size] uint8 pixels on the device; raises if any image cannot be decoded."""
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
        return torch.stack(out)
