"""Peak memory of an inference process that serves one adapted classifier.

    .venv/bin/python -m bench.footprint [--arch ViT-B-32] [--batch 8] [--image-px 256] [--release-cuda-pages]

The architecture's zero-shot classifier at random weights is exported as an adapted artifact
into a temporary folder (as bench.inference does). Then a fresh interpreter does what the
inference service does for it: imports the app (`api.inference.main`), loads the artifact and
classifies one batch of images at the model's input size. With `--release-cuda-pages` it first
calls `api.inference.memory.release_cuda_library_pages`, as a service on a host without CUDA
does at startup. The last line printed is one JSON object: the resident size (VmRSS) after each
step, the peak (VmHWM), how many modules were imported and which of the heavy libraries the
serving path should not need were among them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Libraries an adapted classifier does not need; each costs tens of MB once imported.
HEAVY = (
    "open_clip",
    "timm",
    "torchvision",
    "torch._dynamo",
    "sympy",
    "triton",
    "huggingface_hub",
    "ftfy",
    "regex",
    "celery",
    "kombu",
    "redis",
)

# Runs in the measured interpreter: argv[1] is the artifact folder, argv[2] the batch size,
# argv[3] the side of the square test images, argv[4] the heavy modules, argv[5] "release" or "".
_CHILD = """
import json, sys
from pathlib import Path

def rss():
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = round(int(rest.split()[0]) / 1024, 1)
    return values

steps = {}
import api.inference.main
steps["import"] = rss()["VmRSS"]
if sys.argv[5] == "release":
    from api.inference.memory import release_cuda_library_pages
    release_cuda_library_pages()
    steps["release"] = rss()["VmRSS"]
from services.must.export import load_classifier
classifier = load_classifier(Path(sys.argv[1]))
steps["load"] = rss()["VmRSS"]
import torch
from PIL import Image
side = int(sys.argv[3])
images = [Image.new("RGB", (side, side), (i * 30, 90, 160)) for i in range(int(sys.argv[2]))]
with torch.inference_mode():
    probs = classifier.predict(images)
assert probs.shape == (len(images), len(classifier.class_names))
steps["forward"] = rss()["VmRSS"]
heavy = sys.argv[4].split(",")
print(json.dumps({
    "rss_mb": steps,
    "peak_mb": rss()["VmHWM"],
    "modules": len(sys.modules),
    "heavy_imported": [name for name in heavy if name in sys.modules],
}))
"""


def export(arch: str, out_dir: Path) -> Path:
    """The arch's zero-shot classifier at random weights, exported as an adapted artifact."""
    from bench.inference import Case, export_artifact
    from services.must.spec import ModelSpec

    return export_artifact(
        Case(ModelSpec(arch=arch), image_px=0, requests={}, raw_batches=0, raw_singles=0), out_dir
    )


def measure(model_dir: Path, batch: int, image_px: int, release: bool = False) -> dict[str, Any]:
    """Serve `model_dir` in a fresh interpreter run from this checkout; its figures."""
    args = [sys.executable, "-c", _CHILD, str(model_dir), str(batch), str(image_px), ",".join(HEAVY)]
    args.append("release" if release else "")
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the measured process failed:\n{result.stderr[-4000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--release-cuda-pages", action="store_true")
    parser.add_argument("--model-dir", type=Path, help="an exported classifier to serve instead of --arch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="must-footprint-") as tmp:
        model_dir = args.model_dir or export(args.arch, Path(tmp) / "classifier")
        figures = measure(model_dir, args.batch, args.image_px, args.release_cuda_pages)
    print(json.dumps({"arch": args.arch, "batch": args.batch, **figures}))


if __name__ == "__main__":
    main()
