from __future__ import annotations

import json
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import load_file

from services.must import loading
from services.must.errors import ModelLoadError, WeightsUnavailable
from services.must.loading import LoadedClip, ModelSpec, load_clip, resolve_model_config
from tests.services.must.conftest import build_random_clip, save_state_dict

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _assert_ready(clip: LoadedClip, size: tuple[int, int]) -> None:
    assert isinstance(clip.visual, VisionTransformer)
    assert tuple(clip.preprocess.size) == size
    assert not clip.model.training
    assert all(not m.training for m in clip.model.modules())
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())


# --- custom configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_dict", [False, True], ids=["path", "dict"])
def test_custom_config_and_checkpoint(
    as_dict: bool, tiny_config_path: Path, tiny_config: dict[str, Any], tiny_checkpoint: Path
) -> None:
    config = tiny_config if as_dict else str(tiny_config_path)
    clip = load_clip(ModelSpec(config=config, checkpoint=str(tiny_checkpoint)))

    _assert_ready(clip, (32, 32))
    assert clip.model_cfg["embed_dim"] == 128
    assert clip.tokenizer.context_length == 20
    assert clip.tokenizer(["a photo of a cat"]).shape == (1, 20)
    saved = load_file(str(tiny_checkpoint))
    state = clip.model.state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_custom_dict_config_is_not_mutated(tiny_config: dict[str, Any], tiny_checkpoint: Path) -> None:
    before = json.dumps(tiny_config, sort_keys=True)
    load_clip(ModelSpec(config=tiny_config, checkpoint=str(tiny_checkpoint)))
    assert json.dumps(tiny_config, sort_keys=True) == before


def test_wrapped_model_cfg_keeps_its_preprocess_cfg(
    tmp_path: Path, tiny_config: dict[str, Any], tiny_checkpoint: Path
) -> None:
    wrapped = {
        "model_cfg": tiny_config,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps(wrapped))

    clip = load_clip(ModelSpec(config=str(path), checkpoint=str(tiny_checkpoint)))

    _assert_ready(clip, (32, 32))
    assert tuple(clip.preprocess.mean) == (0.5, 0.5, 0.5)
    assert tuple(clip.preprocess.std) == (0.25, 0.25, 0.25)
    assert torch.equal(clip.model.visual.conv1.weight, load_file(str(tiny_checkpoint))["visual.conv1.weight"])


def test_invalid_json_config(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"embed_dim": 128, "vision_cfg": ')
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_clip(ModelSpec(config=str(path)))


def test_json_config_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        load_clip(ModelSpec(config=str(path)))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip(ModelSpec(config=str(tmp_path / "nope.json")))


@pytest.mark.parametrize("missing", ["embed_dim", "vision_cfg", "text_cfg"])
def test_config_missing_keys(missing: str, tiny_config: dict[str, Any]) -> None:
    del tiny_config[missing]
    with pytest.raises(ModelLoadError, match="'embed_dim', 'vision_cfg' and 'text_cfg'"):
        load_clip(ModelSpec(config=tiny_config))


def test_custom_config_rejects_pretrained_tag(tiny_config: dict[str, Any]) -> None:
    with pytest.raises(ModelLoadError, match="checkpoint file, not a pretrained tag"):
        load_clip(ModelSpec(config=tiny_config, pretrained="openai"))


# --- architecture names -----------------------------------------------------------------------


def test_unknown_architecture_lists_usable_vits() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_clip(ModelSpec(arch="ViT-Imaginary-99"))
    message = str(info.value)
    assert "'ViT-Imaginary-99'" in message
    assert "ViT-B-16" in message
    assert "ViT-B-32" in message
    assert "SigLIP" not in message  # timm towers MUST cannot use are not offered


def test_spec_without_model() -> None:
    with pytest.raises(ModelLoadError, match="architecture name or a custom config"):
        resolve_model_config(ModelSpec())


def test_resnet_architecture_is_rejected_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(open_clip, "create_model", must_not_build)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="ViT") as info:
        load_clip(ModelSpec(arch="RN50"))
    assert time.perf_counter() - start < 0.5
    assert "RN50" in str(info.value)


def test_timm_vision_tower_is_rejected(monkeypatch: pytest.MonkeyPatch, tiny_config: dict[str, Any]) -> None:
    monkeypatch.setattr(loading, "_instantiate", lambda cfg: pytest.fail("the model must not be built"))
    tiny_config["vision_cfg"]["timm_model_name"] = "vit_tiny_patch16_224"
    with pytest.raises(ModelLoadError, match="open_clip ViT image tower"):
        load_clip(ModelSpec(config=tiny_config))


def test_attention_pooled_vision_tower_is_rejected(tiny_config: dict[str, Any]) -> None:
    tiny_config["vision_cfg"]["pool_type"] = "avg"
    with pytest.raises(ModelLoadError, match="class token"):
        load_clip(ModelSpec(config=tiny_config))


def test_arch_with_missing_checkpoint_fails_before_building(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("the model must not be built"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip(ModelSpec(arch="ViT-B-32", checkpoint=str(tmp_path / "missing.safetensors")))


# --- bad checkpoints --------------------------------------------------------------------------


def test_checkpoint_of_another_shape_does_not_match(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    other = json.loads(json.dumps(tiny_config))
    other["vision_cfg"]["width"] = 64
    path = save_state_dict(build_random_clip(other), tmp_path / "other.safetensors")

    with pytest.raises(ModelLoadError, match="does not match") as info:
        load_clip(ModelSpec(config=tiny_config, checkpoint=str(path)))
    assert "size mismatch" in str(info.value)  # torch's detail, not just its header line


def test_checkpoint_with_foreign_keys_does_not_match(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ModelLoadError, match="does not match"):
        load_clip(ModelSpec(config=tiny_config, checkpoint=str(path)))


def test_missing_checkpoint_file(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip(ModelSpec(config=tiny_config, checkpoint=str(tmp_path / "missing.safetensors")))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_garbage_checkpoint_file(suffix: str, tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a checkpoint\n" * 40)
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_clip(ModelSpec(config=tiny_config, checkpoint=str(path)))


# --- ViT-B-32, the real-user path, offline ----------------------------------------------------


@pytest.fixture(scope="module")
def vit_b32_source(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A random-weight ViT-B-32 saved as a local checkpoint, one test image and its features."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    path = save_state_dict(model, tmp_path_factory.mktemp("vit_b32") / "vit_b32.safetensors")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.encode_image(image)
    probes = {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".0.attn.in_proj_weight")
    }
    probes["visual.proj"] = model.visual.proj.detach().clone()
    probes["token_embedding.weight"] = model.token_embedding.weight.detach().clone()
    del model
    return SimpleNamespace(path=path, image=image, features=features, probes=probes)


def _assert_probes(clip: LoadedClip, probes: dict[str, torch.Tensor]) -> None:
    state = clip.model.state_dict()
    for key, value in probes.items():
        assert torch.equal(state[key], value), key


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache for the test, and the hub client in offline mode."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


def _put_in_hub_cache(cache: Path, repo_id: str, filename: str, source: Path) -> None:
    """Lay a file out as huggingface_hub's cache keeps a downloaded one (refs/main -> snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(source.read_bytes())


@pytest.mark.slow
def test_vit_b32_with_local_checkpoint(vit_b32_source: SimpleNamespace) -> None:
    clip = load_clip(ModelSpec(arch="ViT-B-32", checkpoint=str(vit_b32_source.path)))

    _assert_ready(clip, (224, 224))
    assert clip.tokenizer.context_length == 77
    assert clip.tokenizer(["a photo of a dog"]).shape == (1, 77)
    assert "quick_gelu" not in clip.model_cfg
    _assert_probes(clip, vit_b32_source.probes)
    with torch.no_grad():
        features = clip.model.encode_image(vit_b32_source.image)
    torch.testing.assert_close(features, vit_b32_source.features)


@pytest.mark.slow
def test_vit_b32_pretrained_tag_from_the_local_hub_cache(
    hub_cache: Path, vit_b32_source: SimpleNamespace
) -> None:
    _put_in_hub_cache(
        hub_cache, "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors", vit_b32_source.path
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = load_clip(ModelSpec(arch="ViT-B-32", pretrained="openai", allow_download=False))

    _assert_ready(clip, (224, 224))
    assert clip.tokenizer.context_length == 77
    _assert_probes(clip, vit_b32_source.probes)
    assert tuple(clip.preprocess.mean) == pytest.approx(OPENAI_MEAN)
    assert clip.preprocess.interpolation == "bicubic"
    # OpenAI's weights need QuickGELU; the plain ViT-B-32 config does not say so.
    assert clip.model_cfg["quick_gelu"] is True
    assert isinstance(clip.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(clip.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not [w for w in caught if "QuickGELU" in str(w.message)]


def test_pretrained_tag_not_cached_with_downloads_off_fails_at_once(hub_cache: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as info:
        load_clip(ModelSpec(arch="ViT-B-32", pretrained="openai", allow_download=False))
    message = str(info.value)
    assert "ViT-B-32 (openai)" in message
    assert "downloads are turned off" in message
    assert "checkpoint" in message
    assert time.perf_counter() - start < 2.0  # fails before building a 150M-parameter model


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> Iterator[None]:
    """A hub that accepts connections and never answers, where the hub client sends its requests."""
    import huggingface_hub.constants as hub

    server = socket.create_server(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        hub,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )
    try:
        yield
    finally:
        server.close()


@pytest.mark.usefixtures("silent_hub")
def test_a_download_that_hangs_fails_within_its_timeout() -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="could not be downloaded within 1 s"):
        load_clip(ModelSpec(arch="ViT-B-32", pretrained="openai", download_timeout=1.0))
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("arch", ["hf-hub:timm/vit_base_patch32_clip_224.openai", "local-dir:/etc"])
def test_schema_prefixed_architectures_are_unknown_and_read_nothing(arch: str, hub_cache: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        load_clip(ModelSpec(arch=arch))
    assert time.perf_counter() - start < 2.0


def test_a_path_as_pretrained_tag_is_not_opened(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        load_clip(ModelSpec(arch="ViT-B-32", pretrained=str(tiny_checkpoint)))


@pytest.mark.usefixtures("hub_cache")
def test_unknown_pretrained_tag() -> None:
    with pytest.raises(ModelLoadError, match="known tags: .*laion2b_s34b_b79k"):
        load_clip(ModelSpec(arch="ViT-B-32", pretrained="no-such-tag"))


# --- open_clip imported on demand -------------------------------------------------------------


def test_hub_weight_file_names_are_open_clips() -> None:
    from open_clip import constants

    assert loading.HF_WEIGHTS_NAME == constants.HF_WEIGHTS_NAME
    assert loading.HF_SAFE_WEIGHTS_NAME == constants.HF_SAFE_WEIGHTS_NAME


def test_model_spec_is_the_one_of_the_open_clip_free_module() -> None:
    from services.must import spec

    assert ModelSpec is spec.ModelSpec
