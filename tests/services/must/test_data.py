"""Tests for services.must.data: decoding, folder scanning, the dataset and the resumable sampler."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.must.data import (
    IMAGE_EXTENSIONS,
    ImageListDataset,
    ImageLoadError,
    ResumableSampler,
    SkipReport,
    decode_image,
    open_image,
    scan_folder,
)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _png(size: tuple[int, int] = (8, 6), mode: str = "RGB", color: int | tuple[int, ...] = 0) -> bytes:
    return _encode(Image.new(mode, size, color), "PNG")


def _noise_png(size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "PNG")


def _jpeg(size: tuple[int, int] = (8, 6)) -> bytes:
    return _encode(Image.new("RGB", size, (10, 200, 30)), "JPEG")


def _take(sampler: ResumableSampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


# decode_image


@pytest.mark.parametrize(
    ("mode", "color"),
    [("RGBA", (10, 20, 30, 0)), ("P", 3), ("L", 77), ("LA", (77, 128)), ("CMYK", (0, 0, 0, 0)), ("1", 1)],
)
def test_decode_image_converts_modes_to_rgb(mode: str, color: int | tuple[int, ...]) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(_encode(Image.new(mode, (5, 4), color), fmt))
    assert img.mode == "RGB"
    assert img.size == (5, 4)


def test_decode_image_palette_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    img = decode_image(_encode(pal, "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)


def test_decode_image_rescales_16_bit_grayscale() -> None:
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    src = Image.frombytes("I;16", (2, 2), values.tobytes())
    img = decode_image(_encode(src, "PNG"))
    assert img.mode == "RGB"
    # PIL's own convert would clip everything above 255 to white.
    assert [img.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 100, 255, 200]


def test_decode_image_rejects_too_many_bytes() -> None:
    data = _png()
    with pytest.raises(ImageLoadError) as exc_info:
        decode_image(data, max_bytes=len(data) - 1)
    assert exc_info.value.reason == "too_large"


def test_decode_image_rejects_too_many_pixels() -> None:
    with pytest.raises(ImageLoadError) as exc_info:
        decode_image(_png((100, 100)), max_pixels=5000)
    assert exc_info.value.reason == "too_many_pixels"
    assert decode_image(_png((50, 100)), max_pixels=5000).size == (50, 100)


@pytest.mark.parametrize("limit", [1000, 4000])
def test_decode_image_maps_pil_decompression_bomb(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    # 1000 makes PIL raise DecompressionBombError (> 2x limit); 4000 only warns (> limit).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageLoadError) as exc_info:
        decode_image(_png((50, 100)))
    assert exc_info.value.reason == "too_many_pixels"


def test_decode_image_does_not_change_global_pixel_limit() -> None:
    before = Image.MAX_IMAGE_PIXELS
    decode_image(_png(), max_pixels=10**12)
    assert before == Image.MAX_IMAGE_PIXELS


def test_decode_image_rejects_non_images_and_corruption() -> None:
    with pytest.raises(ImageLoadError) as not_image:
        decode_image(b"hello, this is text")
    assert not_image.value.reason == "not_an_image"
    data = _noise_png((64, 64))
    with pytest.raises(ImageLoadError) as truncated:
        decode_image(data[: len(data) // 2])
    assert truncated.value.reason == "unreadable"


def test_decode_image_refuses_formats_outside_allow_list() -> None:
    with pytest.raises(ImageLoadError) as exc_info:
        decode_image(_encode(Image.new("RGB", (4, 4)), "PPM"))
    assert exc_info.value.reason == "not_an_image"


# SkipReport


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decode_image_reduces_large_images_to_about_twice_the_input_side(fmt: str) -> None:
    big = Image.linear_gradient("L").resize((2400, 1800)).convert("RGB")
    data = _encode(big, fmt)

    out = decode_image(data, min_side=224)

    assert out.mode == "RGB"
    # The shorter side stays at least twice the input side, the aspect ratio is kept.
    assert 448 <= min(out.size) < 900
    assert abs(out.size[0] / out.size[1] - 4 / 3) < 0.01
    # The content survives the reduction: it still matches the full decode, downscaled.
    full = decode_image(data).resize(out.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(full, dtype=np.int16) - np.asarray(out, dtype=np.int16))
    assert diff.mean() < 3


def test_decode_image_keeps_images_below_four_times_the_input_side() -> None:
    image = Image.new("RGB", (800, 600), (10, 20, 30))

    assert decode_image(_encode(image, "PNG"), min_side=224).size == (800, 600)
    assert decode_image(_encode(image, "PNG")).size == (800, 600)


def test_open_image_reads_the_header() -> None:
    data = _encode(Image.new("RGB", (640, 480)), "PNG")

    assert open_image(data).size == (640, 480)
    with pytest.raises(ImageLoadError, match="not_an_image"):
        open_image(b"not an image")


def test_skip_report_keeps_at_most_five_examples() -> None:
    report = SkipReport()
    for i in range(7):
        report.add("unreadable", f"f{i}.png")
    report.add("too_large", Path("big.png"))
    assert report.total == 8
    assert report.counts == {"unreadable": 7, "too_large": 1}
    assert report.examples["unreadable"] == [f"f{i}.png" for i in range(5)]
    assert json.loads(json.dumps(report.to_dict()))["counts"]["too_large"] == 1


# scan_folder


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.JPG").write_bytes(_jpeg())
    (tmp_path / "png_named.jpg").write_bytes(_png())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "x.jpg").write_text("text pretending to be a jpeg")
    full = _noise_png((64, 64))
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "big.png").write_bytes(_noise_png((100, 100)))
    nested = tmp_path / "sub" / "deeper"
    nested.mkdir(parents=True)
    (nested / "c.webp").write_bytes(_encode(Image.new("RGB", (3, 3)), "WEBP"))
    (tmp_path / ".hidden.png").write_bytes(_png())
    hidden_dir = tmp_path / ".cache"
    hidden_dir.mkdir()
    (hidden_dir / "d.png").write_bytes(_png())
    (hidden_dir / "junk.txt").write_text("ignored")
    return tmp_path


def test_scan_folder_counts_each_reason(image_tree: Path) -> None:
    images, report = scan_folder(image_tree, max_pixels=5000)
    rel = [p.relative_to(image_tree).as_posix() for p in images]
    assert rel == ["a.png", "b.JPG", "png_named.jpg", "sub/deeper/c.webp"]
    assert report.counts == {
        "too_many_pixels": 1,
        "not_an_image_extension": 1,
        "unreadable": 1,
        "not_an_image": 1,
    }
    assert report.examples["not_an_image"] == [str(image_tree / "x.jpg")]
    assert report.examples["unreadable"] == [str(image_tree / "truncated.png")]


def test_scan_folder_without_validation_only_checks_extensions(image_tree: Path) -> None:
    images, report = scan_folder(image_tree, validate=False)
    assert len(images) == 7
    assert report.counts == {"not_an_image_extension": 1}


def test_scan_folder_too_large_file(image_tree: Path) -> None:
    _, report = scan_folder(image_tree, max_bytes=20_000)
    assert report.counts["too_large"] == 1
    assert report.examples["too_large"] == [str(image_tree / "big.png")]


def test_scan_folder_max_images(image_tree: Path) -> None:
    images, _ = scan_folder(image_tree, max_images=2)
    assert [p.name for p in images] == ["a.png", "b.JPG"]


def test_scan_folder_order_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    """Two folders with the same files written in opposite orders list them in the same sorted order."""
    names = ["b.png", "a.png", "sub/z.png", "c.png", "sub/a.png", "B2.png"]
    for folder, order in (("one", names), ("two", names[::-1])):
        for name in order:
            path = tmp_path / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png())
    one = [p.relative_to(tmp_path / "one").as_posix() for p in scan_folder(tmp_path / "one")[0]]
    two = [p.relative_to(tmp_path / "two").as_posix() for p in scan_folder(tmp_path / "two")[0]]
    assert one == two == sorted(names)


def test_scan_folder_missing_or_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    a_file = tmp_path / "file.png"
    a_file.write_bytes(_png())
    with pytest.raises(FileNotFoundError, match="not a directory"):
        scan_folder(a_file)


def test_image_extensions_are_lowercase_with_dot() -> None:
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


# ImageListDataset


def _size_transform(img: Image.Image) -> tuple[int, int]:
    return img.size


def test_dataset_returns_transformed_image_and_index(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_png((i + 1, 2)))
        paths.append(path)
    dataset = ImageListDataset(paths, _size_transform)
    assert len(dataset) == 3
    assert [dataset[i] for i in range(3)] == [((1, 2), 0), ((2, 2), 1), ((3, 2), 2)]
    assert dataset.failed == set()


def test_dataset_skips_file_deleted_after_scan(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png((i + 1, 2)))
    paths, _ = scan_folder(tmp_path)
    paths[1].unlink()
    paths[2].write_text("now garbage")
    dataset = ImageListDataset(paths, _size_transform)
    # Index 1 is gone and 2 is corrupt, so both fall through (wrapping around) to index 0.
    assert dataset[1] == ((1, 2), 0)
    assert dataset[2] == ((1, 2), 0)
    assert dataset.failed == {1, 2}


def test_dataset_raises_when_nothing_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    dataset = ImageListDataset([path], _size_transform)
    path.unlink()
    with pytest.raises(ImageLoadError):
        dataset[0]


# ResumableSampler


def test_sampler_same_seed_same_order_and_epochs_differ() -> None:
    first = _take(ResumableSampler(10, seed=3), 20)
    assert first == _take(ResumableSampler(10, seed=3), 20)
    assert first != _take(ResumableSampler(10, seed=4), 20)
    assert first[:10] != first[10:]
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert first[10:] == expected


def test_sampler_covers_every_item_once_per_epoch() -> None:
    items = _take(ResumableSampler(7, seed=0), 21)
    for epoch in range(3):
        assert sorted(items[epoch * 7 : (epoch + 1) * 7]) == list(range(7))


def test_sampler_position_advances_with_yields() -> None:
    sampler = ResumableSampler(5, seed=1)
    _take(sampler, 7)
    assert sampler.state_dict() == {
        "epoch": 1,
        "index": 2,
        "seed": 1,
        "num_items": 5,
        "drop_last_batch_size": None,
    }


@pytest.mark.parametrize("consumed", [0, 3, 5, 9, 23])
def test_sampler_resume_from_state_after_matches_uninterrupted(consumed: int) -> None:
    reference = _take(ResumableSampler(5, seed=11), consumed + 12)
    running = ResumableSampler(5, seed=11)
    _take(running, consumed + 4)  # the sampler's own position runs ahead, like a prefetching loader
    state = json.loads(json.dumps(running.state_after(consumed)))
    resumed = ResumableSampler(5, seed=11)
    resumed.load_state_dict(state)
    assert _take(resumed, 12) == reference[consumed:]


def test_sampler_state_after_counts_from_loaded_position() -> None:
    reference = _take(ResumableSampler(4, seed=2), 20)
    first = ResumableSampler(4, seed=2)
    first.load_state_dict(ResumableSampler(4, seed=2).state_after(3))
    _take(first, 10)
    second = ResumableSampler(4, seed=2)
    second.load_state_dict(first.state_after(6))  # 3 + 6 = 9 items consumed overall
    assert _take(second, 11) == reference[9:]


def test_sampler_load_rejects_mismatch() -> None:
    state = ResumableSampler(5, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        ResumableSampler(6, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(5, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        ResumableSampler(5, seed=1).load_state_dict({**state, "index": 5})


def test_sampler_drop_last_batch_size_yields_whole_batches_per_epoch() -> None:
    sampler = ResumableSampler(10, seed=5, drop_last_batch_size=4)
    items = _take(sampler, 16)
    for epoch in range(2):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert items[epoch * 8 : (epoch + 1) * 8] == perm[:8]
    assert sampler.state_after(9)["epoch"] == 1
    assert sampler.state_after(9)["index"] == 1


def test_sampler_with_dataloader_and_batch_sampler_resumes() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(6))

    def batches(sampler: ResumableSampler, n: int) -> list[list[int]]:
        batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size=4, drop_last=True)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=0)
        return [batch[0].tolist() for batch in itertools.islice(loader, n)]

    reference = batches(ResumableSampler(6, seed=9), 5)
    running = ResumableSampler(6, seed=9)
    batches(running, 2)
    resumed = ResumableSampler(6, seed=9)
    resumed.load_state_dict(running.state_after(2 * 4))
    assert batches(resumed, 3) == reference[2:]
    assert sorted(list(itertools.chain(*reference))[:6]) == list(range(6))
