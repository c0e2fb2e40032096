"""Which of a job's unlabeled images the served classifier put in each class: a few per class.

The dashboard shows them as thumbnails (api/control/routes/samples.py), read from the dataset's
store by the keys recorded here, so the control API never takes an image location from a request.
They come from the guard's sample, whose predictions the job has already computed.
"""

from __future__ import annotations

from typing import Any

from services.must.adapt import Adaptation
from services.must.guard import ZERO_SHOT
from services.must.instant import InstantRun
from worker.dataset import StagedImages

# Enough to judge a class at a glance; 200 classes of 6 keys stay well under 100 KB of JSON.
SAMPLES_PER_CLASS = 6
# The job row is read on every GET of the job: past ~1,200 keys (large label sets) fewer per class.
MAX_SAMPLES = 1_200


def class_samples(
    run: Adaptation | InstantRun, staged: StagedImages, per_class: int = SAMPLES_PER_CLASS
) -> dict[str, Any]:
    """Up to `per_class` guard-sample images per class of the served classifier, as dataset keys,
    with the class zero-shot gave each and the served classifier's confidence."""
    decision = run.decision or run.choose()
    served = decision.served if decision.served in run.seen else ZERO_SHOT
    probs = run.seen[served].probs
    confidence, labels = probs.max(1)
    zero_shot = run.seen[ZERO_SHOT].labels.tolist()
    key_of = dict(zip(staged.paths, staged.keys, strict=False))
    k = probs.shape[1]
    per_class = max(1, min(per_class, MAX_SAMPLES // k))
    total = 0
    keys: list[list[str]] = [[] for _ in range(k)]
    zs: list[list[int]] = [[] for _ in range(k)]
    conf: list[list[float]] = [[] for _ in range(k)]
    for i, (path, label, p) in enumerate(
        zip(run.guard_paths, labels.tolist(), confidence.tolist(), strict=True)
    ):
        if len(keys[label]) < per_class and path in key_of and total < MAX_SAMPLES:
            total += 1
            keys[label].append(key_of[path])
            zs[label].append(zero_shot[i])
            conf[label].append(round(p, 4))
    return {
        "classifier": decision.served,
        "per_class": per_class,
        "images": len(run.guard_paths),
        "keys": keys,
        "zero_shot": zs,
        "confidence": conf,
    }
