"""The tiny CLIP used by tests, the demo and the benches (see pretrain.py for how it was made)."""

from pathlib import Path

from services.must.loading import ModelSpec

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "tiny_clip_config.json"
CHECKPOINT_PATH = HERE / "tiny_clip.safetensors"
TINY_CLIP_SPEC = ModelSpec(config=str(CONFIG_PATH), checkpoint=str(CHECKPOINT_PATH))

# Held-out labelled target images for scoring: a split no setting was chosen on.
TARGET_TEST_SEED = 3002
