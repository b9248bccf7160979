"""The shapes world: 1-3 coloured shapes at positions, in two sizes, on quiet backgrounds.

Captions name each object's size, colour, shape and position in sentences or terse lists, with
synonyms ("a photo of a small red circle at the left", "photo: big violet box, middle"); a partial
caption names some objects and some of their attributes ("a picture of a red thing").
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image, ImageDraw

from pipelines.worlds import change_one_word, describes, partial_mentions, pick_word  # noqa: F401  (describes: part of a generator)

MAX_OBJECTS = 3

ATTRS = ("shape", "colour", "size", "position")
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = {"red": (215, 35, 35), "green": (35, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 30), "purple": (135, 50, 175), "orange": (240, 130, 25)}
SIZES = {"small": 0.21, "large": 0.32}  # box side / image side: small >= 1/5, large clearly larger
# Object centres (x, y) as fractions: any two large boxes at different positions do not overlap.
POSITIONS = {"left": (0.17, 0.5), "right": (0.83, 0.5), "top": (0.5, 0.17), "bottom": (0.5, 0.83),
             "centre": (0.5, 0.5)}
VOCAB = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
# Every word is one token, so a wrong attribute changes exactly one word of a caption.
WORDS = {
    "shape": {"circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
              "star": ["star"], "cross": ["cross", "plus"], "heart": ["heart"]},
    "colour": {c: [c] for c in COLOURS} | {"purple": ["purple", "violet"]},
    "size": {"small": ["small", "little"], "large": ["large", "big"]},
    "position": {p: [p] for p in POSITIONS} | {"centre": ["centre", "middle"]},
}
SHAPE_ADJECTIVES = {"circle": "round", "square": "square", "triangle": "triangular", "star": "star-shaped",
                    "cross": "cross-shaped", "heart": "heart-shaped"}
NOUNS = ("thing", "object", "shape")  # when a partial caption leaves out the shape
SENTENCE_TEMPLATES = ("a photo of {}", "there is {}", "an image showing {}", "a picture of {}", "{}")
TERSE_TEMPLATES = ("{}", "photo: {}")
POSITION_FRAMES = ("at the {}", "towards the {}", "in the {} area")
ZERO_SHOT = {  # the labels of one-object images, prompted the way the captions speak
    "colour": ("a photo of a {} thing.", "an image showing a {} object.", "a picture of something {}."),
    "shape": ("a photo of a {}.", "an image showing a {}.", "a picture of a {}."),
}

META = {"vocab": {a: list(VOCAB[a]) for a in ATTRS}, "words": WORDS, "shape_adjectives": SHAPE_ADJECTIVES,
        "nouns": list(NOUNS), "templates": {"sentence": list(SENTENCE_TEMPLATES), "terse": list(TERSE_TEMPLATES),
                                            "position_frames": list(POSITION_FRAMES)}}


# ---------------------------------------------------------------- scenes and images
def make_scene(seed: int, split: int, index: int, cfg) -> dict:
    """Objects, their exact placement and colour, and the background of one item."""
    rng = np.random.default_rng([seed, split, index])
    n = MAX_OBJECTS + 1
    while n > (cfg.max_objects or MAX_OBJECTS):  # 1-3 objects at 27/51/22%; a lower cap redraws: renormalised
        n = 1 + int(rng.random() > 0.45) + int(rng.random() > 0.6)
    places = rng.permutation(len(POSITIONS))[:n]  # distinct positions
    shapes, colours, sizes = rng.integers(6, size=n), rng.integers(6, size=n), rng.integers(2, size=n)
    objects = [{"shape": SHAPES[s], "colour": VOCAB["colour"][c], "size": VOCAB["size"][z],
                "position": VOCAB["position"][p]} for p, s, c, z in zip(places, shapes, colours, sizes)]
    objects.sort(key=lambda o: o["size"] != "large")  # object 0 is the (first) largest
    centres = [POSITIONS[o["position"]] for o in objects]
    jittered = [tuple(c + rng.uniform(-0.02, 0.02, 2)) for c in centres]
    if not overlaps(objects, jittered):  # without jitter the layout never overlaps
        centres = jittered
    rgbs = [tuple(min(255, max(0, c + int(d))) for c, d in zip(COLOURS[o["colour"]], rng.integers(-15, 16, 3)))
            for o in objects]
    grey, warm = rng.uniform(100, 215, 2), rng.uniform(0, 1, 2)  # low saturation: greys to beiges
    tones = [tuple(int(g + w * t) for t in (10, 4, -14)) for g, w in zip(grey, warm)]
    background = {"kind": ("flat", "gradient", "texture")[rng.integers(3)], "tones": tones,
                  "angle": float(rng.uniform(0, 2 * np.pi)), "texture_seed": int(rng.integers(2**31))}
    return {"objects": objects, "centres": centres, "rgbs": rgbs, "background": background}


def overlaps(objects: list[dict], centres: list[tuple]) -> bool:
    half = [SIZES[o["size"]] / 2 for o in objects]
    return any(abs(a[0] - b[0]) < ha + hb and abs(a[1] - b[1]) < ha + hb
               for (a, ha), (b, hb) in itertools.combinations(zip(centres, half), 2))


def background(bg: dict, size: int) -> Image.Image:
    if bg["kind"] == "flat":
        return Image.new("RGB", (size, size), bg["tones"][0])
    first, second = (np.array(t, np.float32) for t in bg["tones"])
    if bg["kind"] == "gradient":
        t = np.linspace(0, 1, size, dtype=np.float32)
        ramp = np.cos(bg["angle"]) * t[None, :] + np.sin(bg["angle"]) * t[:, None]
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
        pixels = first + ramp[..., None] * (second - first)
    else:  # grey noise: texture without colour
        pixels = first + np.random.default_rng(bg["texture_seed"]).normal(0, 7, (size, size, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb: tuple) -> None:
    """One filled shape inside the box of half-side r around (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        s = 0.85 * r  # a full box would look bigger than the circle of the same size
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=rgb)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=rgb)
    elif shape == "cross":
        w = 0.32 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:  # heart: two lobes over a point
        lobe = 0.5 * r
        for x in (cx - lobe, cx + lobe):
            draw.ellipse([x - lobe, cy - r, x + lobe, cy - r + 2 * lobe], fill=rgb)
        draw.polygon([(cx - r, cy - 0.35 * r), (cx + r, cy - 0.35 * r), (cx, cy + r)], fill=rgb)


def render(scene: dict, size: int) -> Image.Image:
    image = background(scene["background"], size)
    draw = ImageDraw.Draw(image)
    for obj, (x, y), rgb in zip(scene["objects"], scene["centres"], scene["rgbs"]):
        draw_shape(draw, obj["shape"], x * size, y * size, SIZES[obj["size"]] * size / 2, rgb)
    return image


# ---------------------------------------------------------------- captions
def make_caption(objects: list[dict], rng: np.random.Generator, partial_rate: float) -> tuple[str, dict]:
    """A caption and its spec: the mentioned attributes of each mentioned object plus the wording."""
    partial = bool(rng.random() < partial_rate)
    mentions = list(objects)  # shares the dicts: nothing mutates a mention in place
    if partial:  # some objects, each with 1-3 of its 4 attributes
        mentions = partial_mentions(objects, ATTRS, rng)
    wording = {"terse": bool(rng.random() < 0.3), "template": int(rng.integers(60)),  # 60: uniform mod 2, 3 and 5
               "frame": int(rng.integers(len(POSITION_FRAMES))), "noun": int(rng.integers(len(NOUNS))),
               "adjective": bool(rng.random() < 0.5), "synonyms": tuple(int(s) for s in rng.integers(0, 2, 4))}
    spec = {"mentions": mentions, "wording": wording, "partial": partial}
    return render_caption(spec), spec


def word(attr: str, value: str, wording: dict) -> str:
    return pick_word(WORDS, ATTRS, attr, value, wording)


def object_phrase(mention: dict, wording: dict) -> str:
    if set(mention) == {"shape"} and wording["adjective"]:
        return "something " + SHAPE_ADJECTIVES[mention["shape"]]
    words = [word(a, mention[a], wording) for a in ("size", "colour") if a in mention]
    words.append(word("shape", mention["shape"], wording) if "shape" in mention else NOUNS[wording["noun"]])
    text = " ".join(words)
    if not wording["terse"]:
        text = ("an " if text[0] in "aeiou" else "a ") + text
    if "position" in mention:
        where = word("position", mention["position"], wording)
        text += f", {where}" if wording["terse"] else " " + POSITION_FRAMES[wording["frame"]].format(where)
    return text


def render_caption(spec: dict) -> str:
    wording = spec["wording"]
    phrases = [object_phrase(m, wording) for m in spec["mentions"]]
    if wording["terse"]:
        return TERSE_TEMPLATES[wording["template"] % len(TERSE_TEMPLATES)].format("; ".join(phrases))
    body = phrases[-1] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return SENTENCE_TEMPLATES[wording["template"] % len(SENTENCE_TEMPLATES)].format(body)


def wrong_attribute(spec: dict, objects: list[dict], rng: np.random.Generator) -> str | None:
    """The caption with one attribute word replaced so that it no longer fits the image (None: impossible)."""
    return change_one_word(spec, objects, rng, render_caption, VOCAB)
