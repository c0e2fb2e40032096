"""Pretrain the tiny CLIPs used by the tests, the demo and the adaptation benches.

    .venv/bin/python -m bench.tiny_clip.pretrain [--steps 1200] [--device cpu] [--out PATH]
    .venv/bin/python -m bench.tiny_clip.pretrain --domain glyphs [--steps 1200] ...

Contrastive image-caption pretraining on the SOURCE domain of `bench.shapes` (the default, the
tiny CLIP) or `bench.glyphs` (the glyph CLIP) only; the TARGET domain is never seen, which is
what leaves the zero-shot gap MUST has to close. Captions are
CLIP's prompt templates filled with the class name, so zero-shot prompting works afterwards.
Because a batch of 128 over ten classes holds many captions of the same class, plain InfoNCE
(one positive per row) fights itself; every pair of the same class counts as a positive here.
Source images get random crops and cutout occlusions (see `augment`).
Seeded: the same command with the same software, CPU kind and thread count gives the same weights
(safetensors may write the header's metadata keys in another order). A rerun of the glyph command
gave the committed tensors exactly. The shapes checkpoint came from another machine: rerun on a
2-core AVX-512 one, 0.7% of its fp16 values differ by at most 0.004, with the same zero-shot top-1.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from bench import glyphs, shapes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH, GLYPHS_CHECKPOINT_PATH, GLYPHS_CONFIG_PATH

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


Sampler = Callable[[int, int], tuple[Image.Image, int]]  # (index, seed) -> (image, label)


@dataclass(frozen=True)
class Augment:
    """Strength of `augment`: crop area range, choice of cutout counts, cutout side range."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    cutouts: tuple[int, ...] = (0, 1, 2, 3)
    cutout_px: tuple[int, int] = (4, 10)


@dataclass(frozen=True)
class Domain:
    """What one tiny CLIP is pretrained on and evaluated with, and its defaults."""

    class_names: tuple[str, ...]
    source: Sampler
    targets: dict[str, Sampler]
    config_path: Path
    checkpoint_path: Path
    steps: int
    batch: int = 128
    lr: float = 1e-3
    augment: Augment = field(default_factory=Augment)


DOMAINS: dict[str, Domain] = {
    # The tiny CLIP; these values made the committed tiny_clip.safetensors.
    "shapes": Domain(
        class_names=shapes.CLASS_NAMES,
        source=lambda i, seed: shapes.sample("source", i, seed),
        targets={"target": lambda i, seed: shapes.sample("target", i, seed)},
        config_path=CONFIG_PATH,
        checkpoint_path=CHECKPOINT_PATH,
        steps=1200,
    ),
    # Milder crops and smaller cutouts: a 50% crop or a 10 px square often removes the stroke
    # that tells two characters apart, which would teach the model to guess.
    "glyphs": Domain(
        class_names=glyphs.CLASS_NAMES,
        source=lambda i, seed: glyphs.sample("source", i, seed),
        targets={
            name: (lambda i, seed, name=name: glyphs.sample("target", i, seed, style=name))
            for name in glyphs.PRESETS
        },
        config_path=GLYPHS_CONFIG_PATH,
        checkpoint_path=GLYPHS_CHECKPOINT_PATH,
        steps=1200,
        augment=Augment(crop_scale=(0.7, 1.0), cutouts=(0, 1, 2), cutout_px=(3, 7)),
    ),
}


def build_model(config_path: Path = CONFIG_PATH) -> open_clip.CLIP:
    return open_clip.CLIP(**json.loads(config_path.read_text()))


def augment(image: Image.Image, rng: random.Random, strength: Augment = Augment()) -> Image.Image:
    """Random resized crop and cutout occlusions, the variety web images give a real CLIP.

    Without them the tiny CLIP only knows whole, unoccluded shapes, and its predictions flip
    under the crops and masks MUST's student sees; a real CLIP is robust to both.
    """
    w, h = image.size
    scale = rng.uniform(*strength.crop_scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, round(math.sqrt(scale * w * h * ratio)))
    ch = min(h, round(math.sqrt(scale * w * h / ratio)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice(strength.cutouts)):
        size = rng.randint(*strength.cutout_px)
        cx, cy = rng.randint(0, w - size), rng.randint(0, h - size)
        draw.rectangle(
            (cx, cy, cx + size - 1, cy + size - 1), fill=tuple(rng.randrange(256) for _ in range(3))
        )
    return image


def to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2) - MEAN) / STD


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """Symmetric contrastive loss whose targets spread evenly over every same-class pair."""
    logits = scale * img @ txt.t()
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-targets * F.log_softmax(logits.t(), 1), 1).mean()
    )


@torch.no_grad()
def zero_shot_top1(
    model: open_clip.CLIP, class_names: tuple[str, ...], sampler: Sampler, count: int, seed: int
) -> float:
    device = next(model.parameters()).device
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    head = open_clip.build_zero_shot_classifier(
        model, tokenizer, class_names, SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=None
    )
    model.eval()
    correct = 0
    for start in range(0, count, 250):
        batch = [sampler(i, seed) for i in range(start, min(count, start + 250))]
        feats = model.encode_image(to_tensor([im for im, _ in batch]).to(device), normalize=True)
        pred = (feats @ head).argmax(1).cpu()
        correct += int((pred == torch.tensor([lbl for _, lbl in batch])).sum())
    model.train()
    return 100.0 * correct / count


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    log_every: int,
    device: str = "cpu",
    domain: Domain = DOMAINS["shapes"],
) -> open_clip.CLIP:
    torch.manual_seed(seed)
    random.seed(seed)
    model = build_model(domain.config_path).to(device)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    captions = [[t(c) for t in OPENAI_IMAGENET_TEMPLATES] for c in domain.class_names]
    tokens = torch.stack([tokenizer(caps) for caps in captions]).to(device)  # [classes, templates, ctx]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    rng = random.Random(seed)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10))
        images, labels = zip(*(domain.source(step * batch + i, seed) for i in range(batch)), strict=True)
        images = tuple(augment(im, rng, domain.augment) for im in images)
        labels_t = torch.tensor(labels, device=device)
        template_idx = torch.tensor(
            [rng.randrange(len(OPENAI_IMAGENET_TEMPLATES)) for _ in labels], device=device
        )
        img = model.encode_image(to_tensor(list(images)).to(device), normalize=True)
        txt = model.encode_text(tokens[labels_t, template_idx], normalize=True)
        loss = multi_positive_loss(img, txt, labels_t, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f}s", flush=True)
    return model


def save_checkpoint(model: open_clip.CLIP, path: Path, config_path: Path = CONFIG_PATH) -> None:
    """fp16 storage halves the file; the engine loads it back as fp32."""
    state = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "open_clip", "config": config_path.name})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", choices=tuple(DOMAINS), default="shapes")
    parser.add_argument("--steps", type=int, help="default: 1200")
    parser.add_argument("--batch", type=int, help="default: 128")
    parser.add_argument("--lr", type=float, help="default: 1e-3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--device", default="cpu", help="the committed checkpoint was made on cpu; cuda gives a close one"
    )
    parser.add_argument("--out", type=Path, help="default: the domain's committed checkpoint")
    args = parser.parse_args()
    domain = DOMAINS[args.domain]
    out = args.out or domain.checkpoint_path
    model = pretrain(
        args.steps or domain.steps,
        args.batch or domain.batch,
        args.lr or domain.lr,
        args.seed,
        args.log_every,
        device=args.device,
        domain=domain,
    )
    save_checkpoint(model, out, domain.config_path)
    names = domain.class_names
    print(f"source zero-shot top-1 {zero_shot_top1(model, names, domain.source, 1000, seed=123):.1f}")
    for name, sampler in domain.targets.items():
        label = "target" if name == "target" else f"target {name}"
        print(f"{label} zero-shot top-1 {zero_shot_top1(model, names, sampler, 1000, seed=123):.1f}")
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
