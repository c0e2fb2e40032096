"""The tiny CLIPs used by tests, the demo and the benches (see pretrain.py for how they were made).

`TINY_CLIP_SPEC` knows the ten classes of `bench.shapes`; `GLYPHS_CLIP_SPEC` knows the 106
characters and symbols of `bench.glyphs` (`GLYPHS_CLASS_NAMES`). Each was pretrained on its
domain's SOURCE images only.
"""

from pathlib import Path

from bench.glyphs import CLASS_NAMES as GLYPHS_CLASS_NAMES
from services.must.loading import ModelSpec

__all__ = [
    "CHECKPOINT_PATH",
    "CONFIG_PATH",
    "GLYPHS_CHECKPOINT_PATH",
    "GLYPHS_CLASS_NAMES",
    "GLYPHS_CLIP_SPEC",
    "GLYPHS_CONFIG_PATH",
    "TARGET_TEST_SEED",
    "TINY_CLIP_SPEC",
]

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "tiny_clip_config.json"
CHECKPOINT_PATH = HERE / "tiny_clip.safetensors"
TINY_CLIP_SPEC = ModelSpec(config=str(CONFIG_PATH), checkpoint=str(CHECKPOINT_PATH))

# Held-out labelled target images for scoring: a split no setting was chosen on.
TARGET_TEST_SEED = 3002

GLYPHS_CONFIG_PATH = HERE / "glyphs_clip_config.json"
GLYPHS_CHECKPOINT_PATH = HERE / "glyphs_clip.safetensors"
GLYPHS_CLIP_SPEC = ModelSpec(config=str(GLYPHS_CONFIG_PATH), checkpoint=str(GLYPHS_CHECKPOINT_PATH))
