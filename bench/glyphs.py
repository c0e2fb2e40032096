"""A second synthetic image domain: font-rendered characters and symbols (106 classes).

SOURCE is what the glyph CLIP (`bench.tiny_clip.GLYPHS_CLIP_SPEC`) was pretrained on: one
character in DejaVu Sans (book weight), dark grey on a light grey flat background, near the
middle of the frame, with a little size and position jitter and a tilt of at most 8 degrees.
TARGET keeps the classes and changes one thing; `GlyphTarget` holds the strengths and `PRESETS`
names the measured ones (pass `style=` a name or a `GlyphTarget`):

- "style": another typeface, DejaVu Serif in book, italic and bold italic.
- "colour": muted coloured ink on tinted paper (`INK_ON_PAPER`), shaded as a gradient.
- "blur": the frame scaled down to 13-17 px and back up, blurred, with sensor noise.
- "rotation": turned by 12-25 degrees either way.

Each preset leaves the zero-shot glyph CLIP at 40-55% top-1 (97% on SOURCE) while a labelled
10-NN probe on its frozen features reaches 80-86% on the same target: the classes stay
recoverable without labels (see the numbers above `PRESETS`). Stronger settings break the
features rather than the prompts: light-on-dark glyphs, or a colour channel whose contrast flips,
leave the probe near zero-shot.

The classes were chosen to stay apart at 32 px: digits, capitals, the small letters whose shape
differs from their capital, the Greek letters that differ from Latin ones, and common symbols.
Pairs that differ only in size or position (c/C, o/O/0, l/I/1, s/S, x/X, p/P, ...) keep one
member. Glyphs are centred by their ink box, so shape (and the font's relative size) tells
classes apart. Every image is a pure function of (domain, index, seed, style).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bench.shapes import png_bytes

__all__ = [
    "CANVAS",
    "CHARACTERS",
    "CLASS_NAMES",
    "DEFAULT_PRESET",
    "DOMAINS",
    "INK_ON_PAPER",
    "PRESETS",
    "SOURCE_FONT",
    "GlyphTarget",
    "font_path",
    "iter_domain",
    "png_bytes",
    "resolve_style",
    "sample",
    "target_fonts",
    "write_folder",
]

_DIGITS = [(str(d), f"digit {d}") for d in range(10)]
# No I (a bar like 1) and no O (an oval like 0).
_CAPITALS = [(c, f"capital {c.lower()}") for c in "ABCDEFGHJKLMNPQRSTUVWXYZ"]
# Only the small letters whose shape is not a smaller copy of their capital.
_SMALL = [(c, f"small {c}") for c in "abdefghijmnqrty"]
# Greek letters that look like no Latin letter, digit or other class here.
_GREEK_CAPITALS = [
    ("\u0393", "capital gamma"),
    ("\u0394", "capital delta"),
    ("\u0398", "capital theta"),
    ("\u039b", "capital lambda"),
    ("\u039e", "capital xi"),
    ("\u03a3", "capital sigma"),
    ("\u03a6", "capital phi"),
    ("\u03a8", "capital psi"),
    ("\u03a9", "capital omega"),
]
_GREEK_SMALL = [
    ("\u03b1", "alpha"),
    ("\u03b2", "beta"),
    ("\u03b4", "delta"),
    ("\u03b5", "epsilon"),
    ("\u03b6", "zeta"),
    ("\u03b7", "eta"),
    ("\u03bb", "lambda"),
    ("\u03bc", "mu"),
    ("\u03be", "xi"),
    ("\u03c0", "pi"),
    ("\u03c3", "sigma"),
    ("\u03c9", "omega"),
]
_SYMBOLS = [
    ("+", "plus sign"),
    ("=", "equals sign"),
    ("%", "percent sign"),
    ("&", "ampersand"),
    ("@", "at sign"),
    ("#", "number sign"),
    ("$", "dollar sign"),
    ("?", "question mark"),
    ("!", "exclamation mark"),
    ("*", "asterisk"),
    ("<", "less-than sign"),
    (">", "greater-than sign"),
    ("{", "left curly bracket"),
    ("}", "right curly bracket"),
    ("[", "left square bracket"),
    ("]", "right square bracket"),
    ("(", "left parenthesis"),
    (")", "right parenthesis"),
    ("/", "slash"),
    ("~", "tilde"),
    ("^", "caret"),
    ("\u20ac", "euro sign"),
    ("\u00a3", "pound sign"),
    ("\u00a5", "yen sign"),
    ("\u00a7", "section sign"),
    ("\u00b6", "pilcrow"),
    ("\u00f7", "division sign"),
    ("\u00b1", "plus-minus sign"),
    ("\u221a", "square root"),
    ("\u221e", "infinity"),
    ("\u2192", "rightwards arrow"),
    ("\u2191", "upwards arrow"),
    ("\u2660", "spade suit"),
    ("\u2663", "club suit"),
    ("\u2665", "heart suit"),
    ("\u2666", "diamond suit"),
]
_CLASSES = _DIGITS + _CAPITALS + _SMALL + _GREEK_CAPITALS + _GREEK_SMALL + _SYMBOLS
CHARACTERS: tuple[str, ...] = tuple(ch for ch, _ in _CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(name for _, name in _CLASSES)

CANVAS = 96  # glyphs are drawn large and area-downsampled, which antialiases thin strokes
DOMAINS = ("source", "target")
SOURCE_FONT = "DejaVuSans.ttf"
# Where DejaVu lives on Debian/Ubuntu and on Fedora; GLYPHS_FONT_DIR overrides both.
_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF")


RGB = tuple[float, float, float]
# Muted coloured ink on tinted paper, the "colour" preset. Every ink stays darker than its paper
# in each of R, G and B, also where the paper is shaded darkest: a model that only saw greys
# keeps class-separable features under that, so the shift is recoverable. A channel that
# flips (red ink on green paper) or light ink on a dark background (`invert_prob`) is not:
# its features lose the glyph, and a labelled 10-NN probe on them scores about zero-shot
# (inverted: 1% zero-shot, 20% probe).
INK_ON_PAPER: tuple[tuple[RGB, RGB], ...] = (
    ((0.7, 0.1, 0.1), (1.0, 1.0, 0.85)),  # red on cream
    ((0.15, 0.3, 0.75), (0.9, 0.95, 1.0)),  # blue on pale blue
    ((0.2, 0.55, 0.2), (0.95, 1.0, 0.9)),  # green on pale green
    ((0.6, 0.2, 0.6), (1.0, 0.92, 1.0)),  # purple on pale pink
    ((0.65, 0.4, 0.15), (1.0, 0.95, 0.85)),  # brown on beige
    ((0.1, 0.5, 0.6), (0.9, 1.0, 1.0)),  # teal on pale cyan
)


@dataclass(frozen=True)
class GlyphTarget:
    """One kind of shift from SOURCE; the defaults are SOURCE's own values (no shift).

    `PRESETS` holds the measured settings; build a new one with `dataclasses.replace`.
    """

    # Font faces, drawn uniformly (file names in the DejaVu folder).
    fonts: tuple[str, ...] = (SOURCE_FONT,)
    # Colour: (ink, paper) pairs as RGB in 0..1, one drawn per image; none: SOURCE's dark grey
    # on light grey. The far side of the background is its near side times `shading`: a
    # gradient. `invert_prob` swaps light and dark.
    palette: tuple[tuple[RGB, RGB], ...] = ()
    shading: tuple[float, float] = (1.0, 1.0)
    invert_prob: float = 0.0
    # Resolution: the frame is scaled down to this many pixels square (None: not at all) and
    # back up; then a Gaussian blur (radius in output pixels) and sensor noise (std, 0..1).
    low_res: tuple[int, int] | None = None
    blur: tuple[float, float] = (0.0, 0.0)
    noise_std: float = 0.0
    # Rotation in degrees, either way: SOURCE's tilt is (0, 8).
    rotation: tuple[float, float] = (0.0, 8.0)


# Measured on the committed glyph CLIP, 1,000 test images each (zero-shot -> labelled 10-NN
# probe on its frozen features fitted on 3,000 others, top-1 %): source 97.3 -> 97.5; style
# 54.4 -> 80.4; colour 55.2 -> 86.4; blur 47.8 -> 81.6; rotation 39.6 -> 85.7
# (`python -m bench.tiny_clip.probe`). Stronger settings, for reference (about 1,000 images):
# rotation (15, 30) 26 -> 77 and (20, 35) 16 -> 76; blur low_res (11, 15) 29 -> 68.
PRESETS: dict[str, GlyphTarget] = {
    "style": GlyphTarget(fonts=("DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf")),
    "colour": GlyphTarget(palette=INK_ON_PAPER, shading=(0.85, 1.0)),
    "blur": GlyphTarget(low_res=(13, 17), blur=(0.2, 0.6), noise_std=0.04),
    "rotation": GlyphTarget(rotation=(12.0, 25.0)),
}
DEFAULT_PRESET = "style"
_SOURCE_STYLE = GlyphTarget()


def font_path(name: str) -> Path:
    """The file of a DejaVu face; raises FileNotFoundError with the folders that were searched."""
    env = os.environ.get("GLYPHS_FONT_DIR")
    dirs = (env, *_FONT_DIRS) if env else _FONT_DIRS
    for folder in dirs:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"font {name} not found in {', '.join(dirs)}; install the DejaVu fonts (Debian: fonts-dejavu) "
        "or set GLYPHS_FONT_DIR"
    )


@functools.lru_cache(maxsize=512)
def _font(name: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), px)


def target_fonts() -> tuple[str, ...]:
    """Every face SOURCE and the presets draw with."""
    names = [SOURCE_FONT]
    for preset in PRESETS.values():
        names += [f for f in preset.fonts if f not in names]
    return tuple(names)


def resolve_style(style: str | GlyphTarget) -> GlyphTarget:
    if isinstance(style, GlyphTarget):
        return style
    if style not in PRESETS:
        raise ValueError(f"style must be a GlyphTarget or one of {tuple(PRESETS)}, got {style!r}")
    return PRESETS[style]


def _glyph_mask(ch: str, font_name: str, rng: random.Random, rotation: tuple[float, float]) -> Image.Image:
    """The glyph's coverage on the canvas: jittered size and centre, rotated about its ink centre."""
    # The font size sets the glyph's scale, so classes keep their relative sizes (a tilde is
    # short, a bracket tall); cap height is about 0.73 of it in DejaVu Sans.
    font = _font(font_name, round(CANVAS * rng.uniform(0.62, 0.76)))
    big = 2 * CANVAS
    mask = Image.new("L", (big, big), 0)
    left, top, right, bottom = font.getbbox(ch)
    # The ink box's centre goes to the middle of the oversized layer, then rotates about it.
    ImageDraw.Draw(mask).text((big / 2 - (left + right) / 2, big / 2 - (top + bottom) / 2), ch, 255, font)
    angle = rng.uniform(*rotation) * (1 if rng.random() < 0.5 else -1)
    mask = mask.rotate(angle, Image.Resampling.BICUBIC)
    box = mask.getbbox() or (big // 2, big // 2, big // 2 + 1, big // 2 + 1)
    # Shift by up to 8% of the frame, less where the ink would cross the border.
    w, h = box[2] - box[0], box[3] - box[1]
    slack_x, slack_y = max(0.0, (CANVAS - 4 - w) / 2), max(0.0, (CANVAS - 4 - h) / 2)
    dx = rng.uniform(-1, 1) * min(0.08 * CANVAS, slack_x)
    dy = rng.uniform(-1, 1) * min(0.08 * CANVAS, slack_y)
    cx, cy = (box[0] + box[2]) / 2 - dx, (box[1] + box[3]) / 2 - dy
    x0, y0 = round(cx - CANVAS / 2), round(cy - CANVAS / 2)
    return mask.crop((x0, y0, x0 + CANVAS, y0 + CANVAS))


def _colours(rng: random.Random, style: GlyphTarget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Glyph colour and the two ends of the background gradient, as RGB floats in 0..255."""
    if style.palette:
        ink, paper = style.palette[int(rng.random() * len(style.palette))]
        fg = np.array(ink) * 255.0 * rng.uniform(0.7, 1.0)
        bg = (np.array(paper) * 255.0 + [rng.uniform(-12, 12) for _ in range(3)]).clip(0, 255)
    else:
        grey = rng.uniform(200, 255)
        bg = np.array([grey + rng.uniform(-12, 12) for _ in range(3)]).clip(0, 255)
        fg = np.array([rng.uniform(0, 70)] * 3)
    far = bg * rng.uniform(*style.shading)
    if rng.random() < style.invert_prob:
        return 255.0 - fg, 255.0 - bg, 255.0 - far
    return fg, bg, far


def _compose(mask: Image.Image, rng: random.Random, style: GlyphTarget) -> Image.Image:
    fg, bg_a, bg_b = _colours(rng, style)
    t = np.linspace(0.0, 1.0, CANVAS)[None, :, None]
    background = bg_a * (1 - t) + bg_b * t
    background = np.broadcast_to(background, (CANVAS, CANVAS, 3))
    if rng.random() < 0.5:
        background = background.transpose(1, 0, 2)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    return Image.fromarray((background * (1 - alpha) + fg * alpha).round().astype(np.uint8))


def render(label: int, rng: random.Random, style: GlyphTarget, size: int) -> Image.Image:
    """Class `label` drawn with `style` (SOURCE is `GlyphTarget()`), at `size` pixels square."""
    # One draw per decision, whatever the style: styles share the random stream (see `sample`).
    font_name = style.fonts[int(rng.random() * len(style.fonts))]
    img = _compose(_glyph_mask(CHARACTERS[label], font_name, rng, style.rotation), rng, style)
    if style.low_res is not None:
        low = round(rng.uniform(style.low_res[0] - 0.5, style.low_res[1] + 0.5))
        img = img.resize((low, low), Image.Resampling.BOX).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    blur = rng.uniform(*style.blur)
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur * CANVAS / size))
    img = img.resize((size, size), Image.Resampling.BOX)
    noise_seed = rng.randrange(2**32)
    if style.noise_std > 0:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr + np.random.default_rng(noise_seed).normal(0.0, style.noise_std, arr.shape)
        img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    return img


def sample(
    domain: str, index: int, seed: int, size: int = 32, style: str | GlyphTarget = DEFAULT_PRESET
) -> tuple[Image.Image, int]:
    """Image `index` of a seeded domain, as (RGB image, label); labels cycle so classes stay balanced.

    `style` (a preset name or a `GlyphTarget`) picks the TARGET shift and is ignored for SOURCE.
    Every style draws from the same random stream: the same index and seed give the same class
    and, where the style leaves them alone, the same size, position and colours.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    spec = _SOURCE_STYLE if domain == "source" else resolve_style(style)
    rng = random.Random(f"glyphs:{domain}:{seed}:{index}")
    label = index % len(CLASS_NAMES)
    return render(label, rng, spec, size), label


def iter_domain(
    domain: str, count: int, seed: int, size: int = 32, style: str | GlyphTarget = DEFAULT_PRESET
) -> Iterator[tuple[Image.Image, int]]:
    for i in range(count):
        yield sample(domain, i, seed, size, style)


def write_folder(
    domain: str,
    count: int,
    seed: int,
    out: Path,
    size: int = 32,
    style: str | GlyphTarget = DEFAULT_PRESET,
) -> list[tuple[Path, int]]:
    """Write `count` images as PNG files into `out` (flat, unlabeled names) and return (path, label)."""
    out.mkdir(parents=True, exist_ok=True)
    tag = domain if domain == "source" or not isinstance(style, str) else f"{domain}-{style}"
    written = []
    for i, (img, label) in enumerate(iter_domain(domain, count, seed, size, style)):
        path = out / f"{tag}-{seed}-{i:06d}.png"
        img.save(path)
        written.append((path, label))
    return written
