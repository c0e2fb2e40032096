"""Design check of a domain's target shifts: zero-shot top-1 beside a labelled 10-NN probe.

    .venv/bin/python -m bench.tiny_clip.probe [--domain glyphs] [--checkpoint PATH]

For SOURCE and each TARGET of a domain it prints the pretrained model's zero-shot top-1 and the
top-1 of a 10-nearest-neighbour classifier on its frozen, normalised image features, fitted on
labelled images of the same domain and scored on held-out ones. The probe uses labels, so it is
no part of the platform: it only says how much of a target a label-free method could recover
from these features (the probe's top-1 minus zero-shot), which is how the presets of
`bench.glyphs` were sized.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import open_clip
import torch
from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

from bench.tiny_clip.pretrain import DOMAINS, Sampler, to_tensor
from services.must.loading import ModelSpec, load_clip


@torch.no_grad()
def features(
    model: open_clip.CLIP, sampler: Sampler, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for start in range(0, count, 256):
        batch = [sampler(i, seed) for i in range(start, min(count, start + 256))]
        feats.append(model.encode_image(to_tensor([im for im, _ in batch]), normalize=True))
        labels += [label for _, label in batch]
    return torch.cat(feats), torch.tensor(labels)


def knn_top1(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], k: int
) -> float:
    """Majority vote of the k most cosine-similar training images (ties: the higher summed similarity)."""
    sims = test[0] @ train[0].t()
    top, idx = sims.topk(k, dim=1)
    num_classes = int(train[1].max()) + 1
    votes = torch.zeros(len(test[1]), num_classes).scatter_add_(1, train[1][idx], torch.ones_like(top))
    votes += 1e-3 * torch.zeros_like(votes).scatter_add_(1, train[1][idx], top)
    return 100.0 * float((votes.argmax(1) == test[1]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", choices=tuple(DOMAINS), default="glyphs")
    parser.add_argument("--checkpoint", type=Path, help="default: the domain's committed checkpoint")
    parser.add_argument("--train", type=int, default=3000, help="labelled images the probe is fitted on")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    domain = DOMAINS[args.domain]
    spec = ModelSpec(
        config=str(domain.config_path), checkpoint=str(args.checkpoint or domain.checkpoint_path)
    )
    clip = load_clip(spec, "cpu")
    head = open_clip.build_zero_shot_classifier(
        clip.model, clip.tokenizer, domain.class_names, SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=None
    )
    print(f"{'domain':<18} {'zero-shot':>9} {f'{args.k}-NN probe':>12}")
    for name, sampler in {"source": domain.source, **domain.targets}.items():
        test = features(clip.model, sampler, args.test, seed=123)
        train = features(clip.model, sampler, args.train, seed=1)
        zero_shot = 100.0 * float(((test[0] @ head).argmax(1) == test[1]).float().mean())
        print(f"{name:<18} {zero_shot:9.1f} {knn_top1(train, test, args.k):12.1f}", flush=True)


if __name__ == "__main__":
    main()
