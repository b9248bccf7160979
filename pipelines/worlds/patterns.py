"""The patterns world: 1-2 patterned swatches (cards of printed fabric) lying on a table.

Each swatch is printed in one ink colour on a ground colour with a pattern (stripes, checks, dots,
zigzags, grid) at a fine or bold scale. Every pattern covers half its card in ink, has as much edge
per area as the others and is drawn without blended pixels, so the colour histogram of an image
says next to nothing about its pattern: only the structure does. Patterns run across or along the
card (not captioned) and start at a random phase.

Captions read like product listings ("bold striped swatch, red on white (left)") or alt text
("fine blue dots on a cream card at the top"), with synonyms; a partial caption names some swatches
and some of their attributes ("polka-dot card", "red pattern on a card").
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.worlds import change_one_word, describes, partial_mentions, pick_word  # noqa: F401  (describes: part of a generator)

MAX_OBJECTS = 2
ATTRS = ("pattern", "scale", "colour", "ground", "position")
PATTERNS = ("stripes", "checks", "dots", "zigzags", "grid")
SCALES = {"fine": 1 / 8, "bold": 1 / 5.5}  # a stripe period / image side: 4 and 5.8 px at 32 px
# Each pattern's period in stripe periods, such that every pattern has as much edge per area as stripes
# (two edges a period): the pixels along edges, which JPEG blends, do not tell the patterns apart either.
STRETCH = {"stripes": 1.0, "checks": 2.0, "dots": 1.346, "zigzags": np.sqrt(2), "grid": np.sqrt(2)}
INKS = {"red": (200, 30, 35), "green": (25, 135, 55), "blue": (35, 70, 205), "purple": (125, 45, 165),
        "orange": (235, 120, 20), "black": (35, 35, 35)}
GROUNDS = {"white": (245, 245, 240), "cream": (240, 224, 178), "grey": (178, 178, 178), "pink": (242, 182, 196)}
# Card boxes (x0, y0, x1, y1) as fractions: two cards side by side or one above the other; one alone anywhere.
CARDS = {"left": (0.04, 0.08, 0.48, 0.92), "right": (0.52, 0.08, 0.96, 0.92), "top": (0.08, 0.04, 0.92, 0.48),
         "bottom": (0.08, 0.52, 0.92, 0.96), "centre": (0.18, 0.18, 0.82, 0.82)}
PAIRS = (("left", "right"), ("top", "bottom"))
VOCAB = {"pattern": PATTERNS, "scale": tuple(SCALES), "colour": tuple(INKS), "ground": tuple(GROUNDS),
         "position": tuple(CARDS)}
# Every word is one token, so a wrong attribute changes exactly one word of a caption; a pattern's
# adjective (listings) and noun (alt text) share the synonym index.
WORDS = {
    "pattern": {"stripes": ["striped", "stripy"], "checks": ["checked", "gingham"], "dots": ["polka-dot", "spotted"],
                "zigzags": ["zigzag", "chevron"], "grid": ["grid", "windowpane"]},
    "scale": {"fine": ["fine", "mini"], "bold": ["bold", "big"]},
    "colour": {c: [c] for c in INKS},
    "ground": {g: [g] for g in GROUNDS} | {"grey": ["grey", "gray"]},
    "position": {p: [p] for p in CARDS} | {"centre": ["centre", "middle"]},
}
PATTERN_NOUNS = {"stripes": ["stripes", "bands"], "checks": ["checks", "checkers"], "dots": ["dots", "spots"],
                 "zigzags": ["zigzags", "chevrons"], "grid": ["grid", "lattice"]}
NOUNS = ("swatch", "card", "fabric swatch", "sample")
LISTING_TEMPLATES = ("{}", "fabric samples: {}", "swatch set - {}")
ALT_TEMPLATES = ("{}", "photo of {}", "close-up of {}", "flat lay of {}")
LISTING_FRAMES = (" ({})", ", {}")
ALT_FRAMES = (" at the {}", " towards the {}")
ZERO_SHOT = {  # the labels of one-object images, prompted the way the captions speak
    "pattern": ("{} on a card.", "a swatch with {}.", "close-up of {} on a fabric swatch."),
    "colour": ("{} pattern on a card.", "a swatch printed in {}.", "close-up of a {} print."),
}

META = {"vocab": {a: list(VOCAB[a]) for a in ATTRS}, "words": WORDS, "pattern_nouns": PATTERN_NOUNS,
        "nouns": list(NOUNS), "templates": {"listing": list(LISTING_TEMPLATES), "alt": list(ALT_TEMPLATES),
                                            "listing_frames": list(LISTING_FRAMES), "alt_frames": list(ALT_FRAMES)}}


# ---------------------------------------------------------------- scenes and images
def make_scene(seed: int, split: int, index: int, cfg) -> dict:
    """Swatches, their exact boxes, ink and ground colours and pattern phase, and the table of one item."""
    rng = np.random.default_rng([seed, split, index])
    n = 1 + int(rng.random() < 0.6) if (cfg.max_objects or MAX_OBJECTS) > 1 else 1  # 40% one swatch, 60% two
    places = list(PAIRS[rng.integers(len(PAIRS))]) if n == 2 else [VOCAB["position"][rng.integers(len(CARDS))]]
    patterns, scales = rng.integers(len(PATTERNS), size=n), rng.integers(len(SCALES), size=n)
    inks, grounds = rng.integers(len(INKS), size=n), rng.integers(len(GROUNDS), size=n)
    objects = [{"pattern": PATTERNS[p], "scale": VOCAB["scale"][s], "colour": VOCAB["colour"][c],
                "ground": VOCAB["ground"][g], "position": where}
               for where, p, s, c, g in zip(places, patterns, scales, inks, grounds)]
    shifts = rng.uniform(-0.015, 0.015, (n, 2))  # the gap between two cards is 0.04
    boxes = [tuple(v + shift[k % 2] for k, v in enumerate(CARDS[o["position"]])) for o, shift in zip(objects, shifts)]
    colours = [(jitter(INKS[o["colour"]], rng, 12), jitter(GROUNDS[o["ground"]], rng, 8)) for o in objects]
    looks = [{"across": bool(rng.random() < 0.5), "phase": tuple(float(v) for v in rng.uniform(0, 1, 2))}
             for _ in objects]
    tone = rng.uniform(70, 125) + rng.uniform(0, 1) * np.array([12, 4, -12])  # greys to browns, darker than any ground
    table = {"tone": tuple(float(v) for v in tone), "slope": tuple(float(v) for v in rng.uniform(-15, 15, 2)),
             "grain": float(rng.uniform(0, 6)), "grain_seed": int(rng.integers(2**31))}
    return {"objects": objects, "boxes": boxes, "colours": colours, "looks": looks, "table": table}


def jitter(rgb: tuple, rng: np.random.Generator, amount: int) -> tuple:
    return tuple(min(255, max(0, c + int(d))) for c, d in zip(rgb, rng.integers(-amount, amount + 1, 3)))


def ink_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the ink goes, at coordinates in pattern periods; every pattern inks half the plane."""
    if pattern == "stripes":
        return u % 1 < 0.5
    if pattern == "checks":
        return (u % 1 < 0.5) ^ (v % 1 < 0.5)
    if pattern == "dots":  # a staggered lattice, rows sqrt(3)/2 apart; pi r^2 = half a dot's cell
        row = np.sqrt(3) / 2
        first = ((u + 0.5) % 1 - 0.5) ** 2 + ((v + row) % (2 * row) - row) ** 2
        second = (u % 1 - 0.5) ** 2 + (v % (2 * row) - row) ** 2
        return np.minimum(first, second) < 0.5 * row / np.pi
    if pattern == "zigzags":  # bands that rise and fall at 45 degrees, one zig and one zag per period
        return (v + np.abs(u % 1 - 0.5)) % 1 < 0.5
    # grid: lines across and along, as thick as half coverage needs: 1 - (1 - w)^2 = 1/2
    width = 1 - np.sqrt(0.5)
    return (u % 1 < width) | (v % 1 < width)


def render(scene: dict, size: int) -> Image.Image:
    pixels = table(scene["table"], size)
    for obj, box, colours, look in zip(scene["objects"], scene["boxes"], scene["colours"], scene["looks"]):
        draw_card(pixels, obj, box, colours, look)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def table(spec: dict, size: int) -> np.ndarray:
    """A tabletop: a tone, a gentle slope of light and a grey grain."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    light = spec["slope"][0] * t[None, :] + spec["slope"][1] * t[:, None]
    grain = np.random.default_rng(spec["grain_seed"]).normal(0, spec["grain"], (size, size)).astype(np.float32)
    return np.array(spec["tone"], np.float32) + (light + grain)[..., None]


def draw_card(pixels: np.ndarray, obj: dict, box: tuple, colours: tuple, look: dict) -> None:
    """One swatch onto `pixels`, sampled at pixel centres: no pixel blends ink and ground (blended edge pixels
    are more common along slanted and curved edges, and would let a colour histogram tell the patterns apart)."""
    size = pixels.shape[0]
    centres = (np.arange(size) + 0.5) / size
    x0, y0, x1, y1 = box
    cols, rows = np.flatnonzero((centres >= x0) & (centres < x1)), np.flatnonzero((centres >= y0) & (centres < y1))
    period = SCALES[obj["scale"]] * STRETCH[obj["pattern"]]
    u = ((centres[cols] - x0) / period + look["phase"][0])[None, :]
    v = ((centres[rows] - y0) / period + look["phase"][1])[:, None]
    if look["across"]:
        u, v = v, u
    ink, ground = (np.array(c, np.float32) for c in colours)
    pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = np.where(ink_mask(obj["pattern"], u, v)[..., None], ink, ground)


# ---------------------------------------------------------------- captions
def make_caption(objects: list[dict], rng: np.random.Generator, partial_rate: float) -> tuple[str, dict]:
    """A caption and its spec: the mentioned attributes of each mentioned swatch plus the wording."""
    partial = bool(rng.random() < partial_rate)
    mentions = list(objects)  # shares the dicts: nothing mutates a mention in place
    if partial:  # some swatches, each with 1-4 of its 5 attributes
        mentions = partial_mentions(objects, ATTRS, rng)
    wording = {"listing": bool(rng.random() < 0.5), "template": int(rng.integers(12)),  # 12: uniform mod 2, 3 and 4
               "frame": int(rng.integers(2)), "noun": int(rng.integers(len(NOUNS))),
               "synonyms": tuple(int(s) for s in rng.integers(0, 2, len(ATTRS)))}
    spec = {"mentions": mentions, "wording": wording, "partial": partial}
    return render_caption(spec), spec


def word(attr: str, value: str, wording: dict) -> str:
    return pick_word(WORDS, ATTRS, attr, value, wording)


def listing_phrase(mention: dict, wording: dict) -> str:
    """bold striped swatch, red on white (left)"""
    head = [word("scale", mention["scale"], wording)] if "scale" in mention else []
    if "pattern" in mention:
        head.append(word("pattern", mention["pattern"], wording))
    elif head:
        head.append("patterned")
    text = " ".join([*head, NOUNS[wording["noun"]]])
    colour = word("colour", mention["colour"], wording) if "colour" in mention else None
    ground = word("ground", mention["ground"], wording) if "ground" in mention else None
    if colour and ground:
        text += f", {colour} on {ground}"
    elif colour or ground:
        text += f", {colour} print" if colour else f", {ground} ground"
    if "position" in mention:
        text += LISTING_FRAMES[wording["frame"]].format(word("position", mention["position"], wording))
    return text


def alt_phrase(mention: dict, wording: dict) -> str:
    """fine blue dots on a cream card at the top"""
    words = [word(a, mention[a], wording) for a in ("scale", "colour") if a in mention]
    pattern = mention.get("pattern")
    words.append(PATTERN_NOUNS[pattern][wording["synonyms"][ATTRS.index("pattern")] % 2] if pattern else "pattern")
    words += ["on", "a"] + ([word("ground", mention["ground"], wording)] if "ground" in mention else [])
    text = " ".join([*words, NOUNS[wording["noun"]]])
    if "position" in mention:
        text += ALT_FRAMES[wording["frame"]].format(word("position", mention["position"], wording))
    return text


def render_caption(spec: dict) -> str:
    wording = spec["wording"]
    if wording["listing"]:
        body = "; ".join(listing_phrase(m, wording) for m in spec["mentions"])
        return LISTING_TEMPLATES[wording["template"] % len(LISTING_TEMPLATES)].format(body)
    phrases = [alt_phrase(m, wording) for m in spec["mentions"]]
    body = phrases[-1] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return ALT_TEMPLATES[wording["template"] % len(ALT_TEMPLATES)].format(body)


def wrong_attribute(spec: dict, objects: list[dict], rng: np.random.Generator) -> str | None:
    """The caption with one attribute word replaced so that it no longer fits the image (None: impossible)."""
    return change_one_word(spec, objects, rng, render_caption, VOCAB)
