"""Deterministic synthetic image–text data: rendered scenes and varied captions (no Ray).

Each image shows 1–3 objects in one or two groups (shape, colour, size, count, position) on a
plain, striped, checkered, dotted or gradient background. Each caption describes the scene
through one of several templates with synonyms and often leaves attributes out, so the same
caption text can describe several images (relevance is many-to-many; image_id is in KEY.json).

Everything derives from ``numpy.random.default_rng([seed, split, index])``: the same seed gives
byte-identical shards, and train/val/test draw from disjoint streams (no image is shared).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}

SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon"]
SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"], "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangle"], "star": ["star", "five-pointed star"],
    "ring": ["ring", "hoop", "donut"], "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus"], "hexagon": ["hexagon", "six-sided shape"],
}
PLURAL = {"cross": "crosses", "box": "boxes", "plus sign": "plus signs", "rhombus": "rhombuses",
          "round dot": "round dots", "six-sided shape": "six-sided shapes",
          "five-pointed star": "five-pointed stars"}
COLOURS = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (140, 50, 180), "pink": (245, 130, 190),
    "white": (250, 250, 250), "black": (15, 15, 15), "gray": (130, 130, 130),
    "brown": (130, 80, 35), "cyan": (40, 210, 220),
}
COLOUR_WORDS = {"red": ["red", "scarlet"], "purple": ["purple", "violet"], "gray": ["gray", "grey"],
                "cyan": ["cyan", "turquoise"]}
SIZES = {"small": 0.09, "medium": 0.14, "big": 0.21}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium", "medium-sized"],
              "big": ["big", "large", "huge"]}
REGIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "centre": (0.5, 0.5), "top left": (0.27, 0.27), "top right": (0.73, 0.27),
           "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73)}
REGION_PHRASES = {
    "left": ["on the left", "on the left side", "at the left"],
    "right": ["on the right", "on the right side", "at the right"],
    "top": ["at the top", "near the top", "in the upper part"],
    "bottom": ["at the bottom", "near the bottom", "in the lower part"],
    "centre": ["in the centre", "in the middle", "at the center"],
    "top left": ["in the top left corner", "at the upper left"],
    "top right": ["in the top right corner", "at the upper right"],
    "bottom left": ["in the bottom left corner", "at the lower left"],
    "bottom right": ["in the bottom right corner", "at the lower right"],
}
# Pairs of regions for two groups and the relation words "A <rel> B".
PAIRS = [("left", "right", ["to the left of", "left of", "beside"]),
         ("right", "left", ["to the right of", "right of", "next to"]),
         ("top", "bottom", ["above", "over", "on top of"]),
         ("bottom", "top", ["below", "under", "beneath"]),
         ("top left", "bottom right", ["above", "diagonally across from"]),
         ("bottom left", "top right", ["below", "diagonally across from"]),
         ("centre", "bottom", ["above", "over"]),
         ("centre", "top", ["below", "under"])]
BACKGROUNDS = ["plain", "striped", "checkered", "dotted", "gradient"]
BG_WORDS = {"plain": ["plain", "solid", "uniform"], "striped": ["striped", "stripy", "lined"],
            "checkered": ["checkered", "checkerboard", "chequered"],
            "dotted": ["dotted", "polka-dot", "spotted"], "gradient": ["gradient", "fading", "shaded"]}
BG_COLOURS = {"white": (238, 238, 232), "gray": (150, 150, 150), "black": (30, 30, 35),
              "beige": (225, 205, 165), "sky": (170, 205, 235), "mint": (180, 230, 195)}
BG_COLOUR_WORDS = {"white": ["white", "light"], "gray": ["gray", "grey"], "black": ["black", "dark"],
                   "beige": ["beige", "sandy"], "sky": ["light blue", "pale blue"],
                   "mint": ["mint", "pale green"]}
COUNT_WORDS = {1: ["a", "one", "a single"], 2: ["two", "a pair of", "2"], 3: ["three", "3"]}
PREFIXES = ["", "", "", "a picture of ", "an image of ", "a drawing of ", "there is ",
            "this shows ", "a render with "]


@dataclass
class Group:
    shape: str
    colour: str
    size: str
    count: int
    region: str
    centres: list = field(default_factory=list)   # (x, y, radius, angle) per instance, 0..1 units


@dataclass
class Scene:
    groups: list[Group]
    background: str
    bg_colour: str
    bg_colour2: str


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def make_scene(rng: np.random.Generator) -> Scene:
    """A random scene: one group (60%) or two groups in a relative arrangement (40%)."""
    bg = _pick(rng, BACKGROUNDS)
    bgc = _pick(rng, list(BG_COLOURS))
    bgc2 = _pick(rng, [c for c in BG_COLOURS if c != bgc])
    if rng.random() < 0.6:
        regions = [_pick(rng, list(REGIONS))]
        counts = [int(rng.choice([1, 1, 2, 3]))]
    else:
        a, b, _ = PAIRS[int(rng.integers(len(PAIRS)))]
        regions = [a, b]
        counts = [1, 1] if rng.random() < 0.7 else [int(rng.choice([1, 2])), 1]
    groups = []
    used: set[tuple[str, str]] = set()
    for region, count in zip(regions, counts):
        while True:
            shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
            if (shape, colour) not in used:
                break
        used.add((shape, colour))
        size = _pick(rng, ["small", "big"] if count == 1 else ["small", "small", "medium"])
        if len(regions) == 2:
            size = _pick(rng, ["small", "medium", "big"]) if count == 1 else "small"
        g = Group(shape, colour, size, count, region)
        cx, cy = REGIONS[region]
        r = SIZES[size] * (0.85 + 0.3 * rng.random())
        for k in range(count):
            if count == 1:
                dx, dy = rng.normal(0, 0.04, 2)
            else:  # spread instances around the region centre
                ang = 2 * math.pi * k / count + rng.random()
                dx, dy = 0.13 * math.cos(ang), 0.13 * math.sin(ang)
            x = float(np.clip(cx + dx, r, 1 - r))
            y = float(np.clip(cy + dy, r, 1 - r))
            g.centres.append((x, y, r, float(rng.uniform(-20, 20))))
        groups.append(g)
    return Scene(groups, bg, bgc, bgc2)


def _jitter(rgb, rng, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _polygon(x, y, r, n, angle, inner=None):
    pts = []
    steps = n * 2 if inner else n
    for i in range(steps):
        rad = (inner if inner and i % 2 else r)
        a = math.radians(angle - 90) + 2 * math.pi * i / steps
        pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
    return pts


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene at 2× and downsample (anti-aliased edges)."""
    S = size * 2
    im = Image.new("RGB", (S, S), _jitter(BG_COLOURS[scene.bg_colour], rng, 10))
    d = ImageDraw.Draw(im)
    c2 = _jitter(BG_COLOURS[scene.bg_colour2], rng, 10)
    if scene.background == "striped":
        step = int(rng.integers(S // 12, S // 6))
        w = max(2, step // 2)
        vertical = rng.random() < 0.5
        for p in range(0, S, step):
            d.rectangle((p, 0, p + w, S) if vertical else (0, p, S, p + w), fill=c2)
    elif scene.background == "checkered":
        step = int(rng.integers(S // 10, S // 5))
        for i in range(0, S, step):
            for j in range(0, S, step):
                if (i // step + j // step) % 2:
                    d.rectangle((i, j, i + step, j + step), fill=c2)
    elif scene.background == "dotted":
        step = int(rng.integers(S // 12, S // 7))
        rr = max(2, step // 5)
        for i in range(step // 2, S, step):
            for j in range(step // 2, S, step):
                d.ellipse((i - rr, j - rr, i + rr, j + rr), fill=c2)
    elif scene.background == "gradient":
        a = np.array(BG_COLOURS[scene.bg_colour], np.float32)
        b = np.array(c2, np.float32)
        t = np.linspace(0, 1, S, dtype=np.float32)[:, None, None]
        arr = (a * (1 - t) + b * t).repeat(S, axis=1).astype(np.uint8)
        if rng.random() < 0.5:
            arr = arr.transpose(1, 0, 2).copy()
        im = Image.fromarray(arr)
        d = ImageDraw.Draw(im)
    for g in scene.groups:
        for (x, y, r, angle) in g.centres:
            fill = _jitter(COLOURS[g.colour], rng)
            X, Y, R = x * S, y * S, r * S
            if g.shape == "circle":
                d.ellipse((X - R, Y - R, X + R, Y + R), fill=fill)
            elif g.shape == "ring":
                d.ellipse((X - R, Y - R, X + R, Y + R), outline=fill, width=max(2, int(R * 0.35)))
            elif g.shape == "square":
                d.polygon(_polygon(X, Y, R * 1.25, 4, angle + 45), fill=fill)
            elif g.shape == "diamond":
                d.polygon([(X, Y - R * 1.2), (X + R * 0.8, Y), (X, Y + R * 1.2), (X - R * 0.8, Y)],
                          fill=fill)
            elif g.shape == "triangle":
                d.polygon(_polygon(X, Y + R * 0.2, R * 1.2, 3, angle * 0.5), fill=fill)
            elif g.shape == "star":
                d.polygon(_polygon(X, Y, R * 1.2, 5, angle, inner=R * 0.5), fill=fill)
            elif g.shape == "hexagon":
                d.polygon(_polygon(X, Y, R * 1.1, 6, angle), fill=fill)
            elif g.shape == "cross":
                t = R * 0.38
                d.rectangle((X - R, Y - t, X + R, Y + t), fill=fill)
                d.rectangle((X - t, Y - R, X + t, Y + R), fill=fill)
    return im.resize((size, size), Image.LANCZOS)


def _noun(rng, shape: str, count: int) -> str:
    w = _pick(rng, SHAPE_WORDS[shape])
    return w if count == 1 else PLURAL.get(w, w + "s")


def _phrase(rng, g: Group, detail: float) -> str:
    """'two small green triangles' with size/colour sometimes left out (coarser captions)."""
    words = [_pick(rng, COUNT_WORDS[g.count])]
    if rng.random() < detail:
        words.append(_pick(rng, SIZE_WORDS[g.size]))
    if rng.random() < 0.85 + 0.15 * detail:
        words.append(_pick(rng, COLOUR_WORDS.get(g.colour, [g.colour])))
    words.append(_noun(rng, g.shape, g.count))
    text = " ".join(words)
    if text.startswith("a ") and text[2] in "aeiou":
        text = "an " + text[2:]
    return text


def _bg_phrase(rng, scene: Scene) -> str:
    kind = _pick(rng, BG_WORDS[scene.background])
    col = _pick(rng, BG_COLOUR_WORDS[scene.bg_colour])
    pre = _pick(rng, ["on a", "over a", "against a", "with a"])
    noun = _pick(rng, ["background", "backdrop"])
    if rng.random() < 0.5:
        return f"{pre} {kind} {noun}"
    return f"{pre} {col} {kind} {noun}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption from a random template; detail varies so captions may fit several images."""
    detail = float(rng.random())
    gs = scene.groups
    if len(gs) == 1:
        body = _phrase(rng, gs[0], detail)
        if rng.random() < 0.65:
            body += " " + _pick(rng, REGION_PHRASES[gs[0].region])
    else:
        rel = next(p[2] for p in PAIRS if p[0] == gs[0].region and p[1] == gs[1].region)
        a, b = _phrase(rng, gs[0], detail), _phrase(rng, gs[1], detail)
        r = rng.random()
        if r < 0.55:
            body = f"{a} {_pick(rng, rel)} {b}"
        elif r < 0.8:
            body = f"{a} and {b}"
        else:
            body = _phrase(rng, gs[int(rng.integers(2))], detail)   # mentions one group only
    if rng.random() < 0.45:
        body += " " + _bg_phrase(rng, scene)
    return (_pick(rng, PREFIXES) + body).strip()


def image_bytes(im: Image.Image, fmt: str = "jpg", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", optimize=False)
    else:
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate_image(seed: int, split: str, index: int, image_size: int = 128,
                   captions_per_image: int = 2) -> tuple[Image.Image, list[str], Scene]:
    """Image ``index`` of ``split``: its picture and distinct captions (deterministic)."""
    rng = np.random.default_rng([seed, SPLIT_INDEX[split], index])
    scene = make_scene(rng)
    im = render(scene, image_size, rng)
    caps: list[str] = []
    for _ in range(captions_per_image * 6):
        c = caption(scene, rng)
        if c not in caps:
            caps.append(c)
        if len(caps) == captions_per_image:
            break
    return im, caps, scene


def generate_samples(seed: int, split: str, n_images: int, image_size: int = 128,
                     captions_per_image: int = 2, start: int = 0):
    """Yield WebDataset samples ``{"key", "image", "ext", "caption", "meta"}`` for images
    ``start..start+n_images`` of ``split``, one sample per (image, caption) pair."""
    for i in range(start, start + n_images):
        im, caps, scene = generate_image(seed, split, i, image_size, captions_per_image)
        data = image_bytes(im)
        image_id = f"{split}-{i:06d}"
        for j, cap in enumerate(caps):
            yield {"key": f"{i:06d}_{j}", "image": data, "ext": "jpg", "caption": cap,
                   "meta": {"image_id": image_id, "caption": cap, "split": split,
                            "objects": [{"shape": g.shape, "colour": g.colour, "size": g.size,
                                         "count": g.count, "region": g.region}
                                        for g in scene.groups],
                            "background": scene.background}}
