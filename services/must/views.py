"""The student's view strength, fitted per job without labels.

The reference's strong view (30% random resized crop, flip, RandAugment with 2 ops at magnitude
9, 30% masking) was set for natural photos at 224 px. On small inputs it can leave nothing to
recognise, and some domains change class under a flip (text, arrows, signs). Neither can be
tuned with labels here, so the strength is read off the zero-shot model itself, on a sample of
the unlabeled images, before training:

- the flip is kept when the zero-shot teacher predicts the same class for a weak view and its
  mirror image on at least `FLIP_AGREEMENT` of the sample;
- the crop and RandAugment strength is the strongest level of `LADDER` at which the teacher's
  prediction on the weak view and the zero-shot student's prediction on the masked strong view
  (what the student sees in training) agree on at least `view_agreement` of the sample.

Pseudo-labels come from the weak view, so a strong view the model cannot read any more only
feeds the student noise; agreement at the start of training is the label-free measure of that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.transform import PreprocessCfg
from torch.utils.data import DataLoader, Dataset

from services.must.data import ImageListDataset, mix_seed
from services.must.masking import cell_size_for, random_cell_mask
from services.must.network import MustNetwork
from services.must.transforms import REFERENCE_POLICY, TwoViews

SAMPLE_IMAGES = 512
FLIP_AGREEMENT = 0.9


@dataclass(frozen=True)
class ViewLevel:
    """One strength of the student's view: RandomResizedCrop's smallest area and a RandAugment policy."""

    crop_min: float
    policy: str


# Strongest first; the first is the reference's view.
LADDER: tuple[ViewLevel, ...] = (
    ViewLevel(0.3, REFERENCE_POLICY),
    ViewLevel(0.5, "rand-n2-m7-mstd0.5-inc1"),
    ViewLevel(0.7, "rand-n2-m5-mstd0.5-inc1"),
    ViewLevel(0.85, "rand-n1-m3-mstd0.5-inc1"),
    ViewLevel(0.95, "rand-n1-m1-mstd0.5-inc1"),
)


@dataclass
class ViewFit:
    """The chosen view and what it was chosen on, for the job's report."""

    crop_min: float
    rand_augment: str
    hflip: bool
    agreement: float | None = None
    flip_agreement: float | None = None
    target: float | None = None
    levels: list[dict[str, Any]] = field(default_factory=list)
    sample_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PathViews(Dataset):
    """(index, seed) -> views(image, seed) of image files; unreadable files fall back to the next one."""

    def __init__(self, paths: Sequence[Path], views: Callable[[Any, int], Any]) -> None:
        self.images = ImageListDataset(paths, transform=_identity)
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        image, _ = self.images[index]
        return self.views(image, seed)


def _identity(image: Any) -> Any:
    return image


def sample_paths(paths: Sequence[Path], limit: int, seed: int = 0) -> list[Path]:
    """Up to `limit` of the paths, drawn at random (seeded) and kept in their order.

    Not every k-th path: sorted names often follow the classes (per-class folders, names that
    cycle through the classes), and a stride would then sample a few classes only.
    """
    if len(paths) <= limit:
        return list(paths)
    chosen = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:limit]
    return [paths[i] for i in sorted(chosen.tolist())]


def seeded_batches(
    paths: Sequence[Path],
    views: Callable[[Any, int], Any],
    seed: int,
    *,
    batch_size: int = 128,
    workers: int = 0,
    pin: bool = False,
    positions: Sequence[int] | None = None,
) -> Iterable[Any]:
    """Batches of views(image_i, mix_seed(seed, i)) over `paths` in order: the same on every call.

    `positions` limits them to those indices (a rank's share), each with the seed it has in the whole.
    """
    order = range(len(paths)) if positions is None else positions
    keys = [(i, mix_seed(seed, i)) for i in order]
    return DataLoader(
        PathViews(paths, views),
        batch_size=batch_size,
        sampler=keys,  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=pin,
    )


def autocast_or_not(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class _Sample:
    """The teacher's predictions on the weak views of the sample, computed once for every level."""

    weak_pred: torch.Tensor
    flip_agreement: float


class ViewFitter:
    """Measures view agreement of a zero-shot network on a sample of images (see module docstring)."""

    def __init__(
        self,
        network: MustNetwork,
        preprocess: PreprocessCfg,
        paths: Sequence[Path],
        *,
        mask_ratio: float,
        seed: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
        workers: int = 0,
        mask_cell: int | None = None,
    ) -> None:
        self.network, self.preprocess, self.paths = network, preprocess, list(paths)
        self.mask_ratio, self.seed, self.device, self.dtype, self.workers = (
            mask_ratio,
            seed,
            device,
            dtype,
            workers,
        )
        self.cell = mask_cell or cell_size_for(network.patch, network.grid[0] * network.patch)

    def _batches(self, level: ViewLevel, hflip: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        views = TwoViews(self.preprocess, level.crop_min, level.policy, hflip)
        pin = self.device.type == "cuda"
        loader = seeded_batches(self.paths, views, self.seed, workers=self.workers, pin=pin)
        for weak, strong in loader:
            yield weak.to(self.device), strong.to(self.device)

    @torch.no_grad()
    def weak_sample(self) -> _Sample:
        """Teacher predictions on the weak views, and how often a mirror image keeps them."""
        self.network.eval()
        preds, same = [], 0
        with autocast_or_not(self.device, self.dtype):
            for weak, _ in self._batches(LADDER[-1], hflip=False):
                pred = self.network(weak).argmax(-1)
                same += int((self.network(weak.flip(-1)).argmax(-1) == pred).sum())
                preds.append(pred.cpu())
        weak_pred = torch.cat(preds)
        return _Sample(weak_pred, same / max(1, len(weak_pred)))

    @torch.no_grad()
    def agreement(self, level: ViewLevel, hflip: bool, weak_pred: torch.Tensor) -> float:
        """Share of the sample where the masked strong view's prediction matches the weak view's."""
        self.network.eval()
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 7))
        hits, seen = 0, 0
        with autocast_or_not(self.device, self.dtype):
            for _, strong in self._batches(level, hflip):
                mask = random_cell_mask(
                    strong.shape[0], self.network.grid, self.cell, self.mask_ratio, gen
                ).to(self.device)
                cls_token, _ = self.network.encode(strong, mask)
                pred = self.network.classify(cls_token).argmax(-1).cpu()
                hits += int((pred == weak_pred[seen : seen + len(pred)]).sum())
                seen += len(pred)
        return hits / max(1, seen)


def fit_views(fitter: ViewFitter, target: float, ladder: Sequence[ViewLevel] = LADDER) -> ViewFit:
    """The strongest level whose agreement reaches `target` (else the mildest), and the flip choice."""
    sample = fitter.weak_sample()
    hflip = sample.flip_agreement >= FLIP_AGREEMENT
    levels: list[dict[str, Any]] = []
    chosen, agreement = ladder[-1], None
    for level in ladder:
        value = fitter.agreement(level, hflip, sample.weak_pred)
        levels.append({"crop_min": level.crop_min, "rand_augment": level.policy, "agreement": value})
        chosen, agreement = level, value
        if value >= target:
            break
    return ViewFit(
        crop_min=chosen.crop_min,
        rand_augment=chosen.policy,
        hflip=hflip,
        agreement=agreement,
        flip_agreement=sample.flip_agreement,
        target=target,
        levels=levels,
        sample_images=len(sample.weak_pred),
    )
