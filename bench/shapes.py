"""Synthetic image domains for the offline proof of adaptation.

SOURCE is the domain the tiny CLIP is pretrained on: filled shapes in flat colours on plain
backgrounds, each shape whole and in the middle of the frame. TARGET has the same classes under
a real distribution shift, in framing and rendering: close-ups (each shape fills most of the
frame and its tips may run past the border), two-colour gradient backgrounds, sensor noise and
blur. Every shape stays plain to a human, so a model that adapts to the target can recover the
classes: a 10-NN probe on the tiny CLIP's frozen target features, which uses the labels, scores
about 30 points above its zero-shot prompts.

`TargetStyle` can also draw outlines, lower the contrast and add clutter strokes. The default
leaves them off: with them the tiny CLIP's frozen target features no longer separate the classes
(the same probe scores barely above zero-shot), so no label-free method can recover much, and
the bench would measure the features' limits rather than adaptation.
Every image is a pure function of (domain, index, seed): data sets are reproducible and need no
storage.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "ring",
    "crescent",
    "arrow",
    "hourglass",
)

CANVAS = 96  # shapes are drawn large and downsampled, which antialiases their edges
DOMAINS = ("source", "target")


@dataclass(frozen=True)
class TargetStyle:
    """Strength of the target domain's shift; the bench's targets were measured with these values."""

    outline_prob: float = 0.0
    stroke_px: tuple[int, int] = (3, 6)
    contrast: tuple[float, float] = (0.8, 1.0)
    clutter_items: tuple[int, int] = (0, 0)
    noise_std: float = 0.06
    blur_radius: tuple[float, float] = (0.0, 0.5)
    # 0: a flat background; 1: a gradient between two independent random colours.
    gradient: float = 1.0
    # Shape radius as a fraction of the frame (SOURCE: 0.26-0.42), and how far past the border a
    # shape may reach, as a fraction of its radius: the target's close-up framing.
    radius: tuple[float, float] = (0.42, 0.5)
    overhang: float = 0.2
    # Tilt of each shape in radians (SOURCE: +-0.35); wider ranges make a rotation shift.
    tilt: tuple[float, float] = (-0.35, 0.35)
    # Swap the shape's and the background's brightness (light shapes become dark ones).
    invert: bool = False


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    verts = []
    for i in range(points * 2):
        r = 1.0 if i % 2 == 0 else inner
        a = math.pi * i / points - math.pi / 2
        verts.append((r * math.cos(a), r * math.sin(a)))
    return verts


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.95), (0.9, 0.75), (-0.9, 0.75)],
    "star": _star(5, 0.42),
    "cross": [
        (-0.3, -0.95),
        (0.3, -0.95),
        (0.3, -0.3),
        (0.95, -0.3),
        (0.95, 0.3),
        (0.3, 0.3),
        (0.3, 0.95),
        (-0.3, 0.95),
        (-0.3, 0.3),
        (-0.95, 0.3),
        (-0.95, -0.3),
        (-0.3, -0.3),
    ],
    "diamond": [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)],
    "arrow": [
        (-0.95, -0.22),
        (0.2, -0.22),
        (0.2, -0.6),
        (0.95, 0.0),
        (0.2, 0.6),
        (0.2, 0.22),
        (-0.95, 0.22),
    ],
    "hourglass": [(-0.75, -0.9), (0.75, -0.9), (0.08, 0.0), (0.75, 0.9), (-0.75, 0.9), (-0.08, 0.0)],
}


def _transform(
    verts: list[tuple[float, float]], cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in verts]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    name: str,
    geom: tuple[float, float, float, float],
    fill: tuple[int, int, int] | None,
    outline: tuple[int, int, int],
    stroke: int,
    background: tuple[int, int, int],
) -> None:
    """Draw one shape, filled when `fill` is given, else as an outline of width `stroke`."""
    cx, cy, r, angle = geom
    box = (cx - r, cy - r, cx + r, cy + r)
    if name in _POLYGONS:
        pts = _transform(_POLYGONS[name], cx, cy, r, angle)
        if fill is not None:
            draw.polygon(pts, fill=fill)
        else:
            draw.line([*pts, pts[0]], fill=outline, width=stroke, joint="curve")
        return
    colour = fill if fill is not None else outline
    width = stroke if fill is None else max(2, int(r * 0.38))
    if name == "circle":
        if fill is not None:
            draw.ellipse(box, fill=fill)
        else:
            draw.ellipse(box, outline=outline, width=stroke)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=width)
        if fill is None:
            inner = r * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=outline, width=stroke)
    elif name == "crescent":
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        cut = (cx + dx - 0.85 * r, cy + dy - 0.85 * r, cx + dx + 0.85 * r, cy + dy + 0.85 * r)
        if fill is not None:
            draw.ellipse(box, fill=fill)
            draw.ellipse(cut, fill=background)
        else:
            draw.ellipse(box, outline=outline, width=stroke)
            draw.ellipse(cut, fill=background, outline=outline, width=stroke)
    else:
        raise ValueError(f"unknown shape {name!r}")


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _contrasting(rng: random.Random, base: tuple[int, int, int], min_dist: float) -> tuple[int, int, int]:
    for _ in range(100):
        colour = _random_colour(rng)
        if math.dist(colour, base) >= min_dist:
            return colour
    return tuple(255 - v for v in base)  # type: ignore[return-value]


def _geometry(
    rng: random.Random,
    radius: tuple[float, float] = (0.26, 0.42),
    overhang: float = 0.0,
    tilt: tuple[float, float] = (-0.35, 0.35),
) -> tuple[float, float, float, float]:
    """Centre, radius and tilt of a shape that reaches at most `overhang` x radius past the border."""
    r = rng.uniform(*radius) * CANVAS
    inset = r * (1.0 - overhang)
    cx = rng.uniform(inset, CANVAS - inset)
    cy = rng.uniform(inset, CANVAS - inset)
    return cx, cy, r, rng.uniform(*tilt)


def render_source(label: int, rng: random.Random) -> Image.Image:
    """A filled shape in a flat colour on a plain, contrasting background."""
    bg = _random_colour(rng)
    img = Image.new("RGB", (CANVAS, CANVAS), bg)
    fg = _contrasting(rng, bg, 160.0)
    _draw_shape(ImageDraw.Draw(img), CLASS_NAMES[label], _geometry(rng), fg, fg, 0, bg)
    return img


def _textured_background(rng: random.Random, style: TargetStyle) -> tuple[Image.Image, tuple[int, int, int]]:
    """A smooth colour gradient, optionally overlaid with random clutter strokes."""
    a, b = np.array(_random_colour(rng), float), np.array(_random_colour(rng), float)
    b = a + style.gradient * (b - a)
    t = np.linspace(0.0, 1.0, CANVAS)[None, :, None]
    grad = a * (1 - t) + b * t
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    grad = np.broadcast_to(grad, (CANVAS, CANVAS, 3))
    img = Image.fromarray(grad.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(*style.clutter_items)):
        pts = [(rng.uniform(0, CANVAS), rng.uniform(0, CANVAS)) for _ in range(2)]
        draw.line(pts, fill=_random_colour(rng), width=rng.randint(1, 3))
    mean = tuple(int(v) for v in grad.reshape(-1, 3).mean(0))
    return img, mean  # type: ignore[return-value]


def _blend(fg: tuple[int, int, int], bg: tuple[int, int, int], alpha: float) -> tuple[int, int, int]:
    return tuple(int(round(alpha * f + (1 - alpha) * b)) for f, b in zip(fg, bg, strict=True))  # type: ignore[return-value]


def render_target(label: int, rng: random.Random, style: TargetStyle = TargetStyle()) -> Image.Image:
    """The class in the target style: a close-up over a gradient, with noise and blur (see TargetStyle)."""
    img, mean_bg = _textured_background(rng, style)
    colour = _blend(_contrasting(rng, mean_bg, 200.0), mean_bg, rng.uniform(*style.contrast))
    outline = rng.random() < style.outline_prob
    fill = None if outline else colour
    _draw_shape(
        ImageDraw.Draw(img),
        CLASS_NAMES[label],
        _geometry(rng, style.radius, style.overhang, style.tilt),
        fill,
        colour,
        rng.randint(*style.stroke_px),
        mean_bg,
    )
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*style.blur_radius)))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, style.noise_std, arr.shape)
    arr = np.clip(arr + noise, 0, 1)
    if style.invert:
        arr = 1.0 - arr
    return Image.fromarray((arr * 255).astype(np.uint8))


def sample(
    domain: str,
    index: int,
    seed: int,
    size: int = 32,
    style: TargetStyle | None = None,
    classes: tuple[int, ...] | None = None,
) -> tuple[Image.Image, int]:
    """Image `index` of a seeded domain, as (image, label); labels cycle so classes stay balanced.

    `classes` restricts the images to those class indices (the label is then the position in
    `classes`); `style` replaces the default TARGET style.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    rng = random.Random(f"{domain}:{seed}:{index}")
    pool = classes if classes is not None else tuple(range(len(CLASS_NAMES)))
    label = index % len(pool)
    shape = pool[label]
    if domain == "source":
        img = render_source(shape, rng)
    else:
        img = render_target(shape, rng, style or TargetStyle())
    return img.resize((size, size), Image.Resampling.BILINEAR), label


def iter_domain(
    domain: str,
    count: int,
    seed: int,
    size: int = 32,
    style: TargetStyle | None = None,
    classes: tuple[int, ...] | None = None,
) -> Iterator[tuple[Image.Image, int]]:
    for i in range(count):
        yield sample(domain, i, seed, size, style, classes)


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG (what the demo, benches and tests upload)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(
    domain: str,
    count: int,
    seed: int,
    out: Path,
    size: int = 32,
    style: TargetStyle | None = None,
    classes: tuple[int, ...] | None = None,
) -> list[tuple[Path, int]]:
    """Write `count` images as PNG files into `out` (flat, unlabeled names) and return (path, label)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (img, label) in enumerate(iter_domain(domain, count, seed, size, style, classes)):
        path = out / f"{domain}-{seed}-{i:06d}.png"
        img.save(path)
        written.append((path, label))
    return written
