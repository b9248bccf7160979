"""The demo world's generators: what its images hold and how its captions speak of them.

    shapes    1-3 coloured shapes at positions, two sizes, on quiet backgrounds;
              "a photo of a small red circle at the left" (zero-shot: shape, colour)
    patterns  1-2 swatches printed with stripes, checks, dots, zigzags or a grid (fine or bold) in
              one ink on a ground colour, on a table; every pattern inks half its card, so only
              structure tells them apart; "bold striped swatch, red on white (left)",
              "fine blue dots on a cream card at the top" (zero-shot: pattern, colour)

A generator is a module with MAX_OBJECTS, VOCAB (attribute -> values; the first object's values
are the truth table's columns), ZERO_SHOT (attribute -> prompt templates), META (its words and
templates, for world.json) and make_scene(seed, split, index, cfg) -> {"objects": [...], ...},
render(scene, size), make_caption(objects, rng, partial_rate) -> (text, spec), render_caption(spec),
describes(mentions, objects) and wrong_attribute(spec, objects, rng). The noise, the splits, the
truth table and the serving are pipelines/world.py's, the same for every kind.
"""

from __future__ import annotations

import importlib
import itertools
from types import ModuleType

import numpy as np

KINDS = ("shapes", "patterns")


def generator(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown world kind {kind!r} (known: {', '.join(KINDS)})")
    return importlib.import_module(f"pipelines.worlds.{kind}")


# ---------------------------------------------------------------- shared by the generators
def partial_mentions(objects: list[dict], attrs: tuple[str, ...], rng: np.random.Generator) -> list[dict]:
    """A partial caption's mentions: some of the objects, each with 1 to len(attrs) - 1 of its attributes."""
    chosen = sorted(rng.choice(len(objects), rng.integers(1, len(objects) + 1), replace=False))
    return [{a: objects[k][a] for a in sorted(rng.choice(attrs, rng.integers(1, len(attrs)), replace=False),
                                              key=attrs.index)} for k in chosen]


def pick_word(words: dict, attrs: tuple[str, ...], attr: str, value: str, wording: dict) -> str:
    """The caption's word for an attribute value: its synonym choice for that attribute."""
    options = words[attr][value]
    return options[wording["synonyms"][attrs.index(attr)] % len(options)]


def describes(mentions: list[dict], objects: list[dict]) -> bool:
    """True when distinct objects of the scene match every mentioned attribute."""
    return any(all(o[a] == m[a] for m, o in zip(mentions, chosen) for a in m)
               for chosen in itertools.permutations(objects, len(mentions)))


def change_one_word(spec: dict, objects: list[dict], rng: np.random.Generator, render_caption, vocab: dict) -> str | None:
    """The caption with one attribute word replaced so that it no longer fits the image (None: impossible)."""
    clean = render_caption(spec).split()
    candidates = [(k, a, v) for k, m in enumerate(spec["mentions"]) for a in m for v in vocab[a] if v != m[a]]
    for pick in rng.permutation(len(candidates)):
        k, attr, value = candidates[pick]
        mentions = [dict(m) for m in spec["mentions"]]
        mentions[k][attr] = value
        text = render_caption({**spec, "mentions": mentions})
        changed = [a != b for a, b in zip(clean, text.split())]  # "a red" -> "an orange" changes two words
        if len(text.split()) == len(clean) and sum(changed) == 1 and not describes(mentions, objects):
            return text
    return None
