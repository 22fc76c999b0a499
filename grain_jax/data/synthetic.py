"""The embedded synthetic grounded benchmark: scenes of made-up objects whose parts carry the meaning.

Why it exists: the default training run must need no download and must still be able to show
GRAIN's claim, that grounding part descriptions in image regions lets a model recognise concepts
it never saw named.

Design
------
* **Concept classes** have made-up names ("dafo", "mibuk", ...) and are defined by a composition
  of part values: body shape (round, square, triangular, diamond-shaped), body colour (6), body
  pattern (plain, striped, spotted, checkered), an attached part (disc, spike or block; its colour,
  small/large, on top / on its left / right side) and a base (none, two thin legs, two wheels, a
  flat stand). Every pair of classes differs in at least two part values. Each class has 4-5
  descriptor phrases naming its parts: "a round body", "a red body", "has a striped body",
  "a small yellow disc on top", "has two wheels".
* **Objects** are drawn part by part (numpy, vectorised over objects); each part's box is the
  tight box of its drawn pixels, the object box their union.
* **Training / validation scenes** hold 1-3 objects of the *seen* classes (2-3 objects go into
  distinct cells of a 2x2 grid) on a light two-colour gradient background with noise. Texts:
  - caption (alt-text style): class names and layout only, "a dafo at top left and a mibuk at
    bottom right";
  - MLLM caption (``mllm_captions="holistic"``, the default): each object's look in one phrase, as
    LLaVA-style captions word it ("a red, striped dafo with a blue disc"): each part value mentioned
    with probability 0.6, 10% of them wrong, the class name half the time (else "object", "toy"...),
    never a box or a part-by-part phrase. ``"names_only"`` (the strict ablation) words names, count,
    layout and background only, never a part or attribute word;
  - regions: up to 5 of the scene's grounded phrases (each object offers its descriptors with the
    box of the part they name, plus "a <name>" with the object box), with detector-like scores.
  With ``unnamed_prob`` > 0 (default 0), some objects are *unnamed*: random part combinations called
  "object" in every text (`_unnamed_objects`).
* **Zero-shot splits** (ImageFolder, one object per image): `seen` (the training classes) and
  `novel`: classes with new names whose part-value combinations never occur in training, while
  every single part value (and so every descriptor word) does. Novel names never occur in
  training, so a novel class can only be recognised from its descriptors: from whole-image
  attribute mentions (holistic captions) or from descriptors grounded in regions (GRAIN).

`ensure_synthetic(directory, ...)` generates everything (cached, written atomically) and returns
the prepared directory: train/validation records through `grain_jax.data.prepare.prepare_dataset`
plus `zeroshot/{seen,novel}/<class>/*.jpg` and `zeroshot/descriptors_{seen,novel}.json`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Part values and their phrases
# ----------------------------------------------------------------------------------------------

SHAPES = ("round", "square", "triangular", "diamond-shaped")
COLOURS = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215),
           "yellow": (235, 200, 25), "purple": (135, 45, 175), "orange": (245, 125, 15)}
COLOUR_NAMES = tuple(COLOURS)
PATTERNS = ("plain", "striped", "spotted", "checkered")
PART_KINDS = ("disc", "spike", "block")
PART_SIZES = ("small", "large")
PART_SIDES = ("top", "left", "right")
BASES = ("none", "legs", "wheels", "stand")

# The factors of a class, in ConceptClass field order, with their number of values.
FACTORS = (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("pattern", len(PATTERNS)),
           ("part_kind", len(PART_KINDS)), ("part_colour", len(COLOURS)), ("part_size", len(PART_SIZES)),
           ("part_side", len(PART_SIDES)), ("base", len(BASES)))
FACTOR_INDEX = {name: i for i, (name, _) in enumerate(FACTORS)}
# Words of the descriptor phrases: no class name may contain one (its BPE pieces would leak them).
ATTRIBUTE_WORDS = ("round", "square", "triangular", "diamond", "body", "striped", "spotted", "checkered",
                   "plain", "disc", "spike", "block", "small", "large", "top", "left", "right", "side", "legs",
                   "wheel", "stand", *COLOURS)

_BASE_PHRASES = {"legs": "has two thin legs", "wheels": "has two wheels", "stand": "has a flat stand"}
_SIDE_PHRASES = {"top": "on top", "left": "on its left side", "right": "on its right side"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class ConceptClass:
    """A named composition of part values (indices into SHAPES, COLOURS, ...)."""
    name: str
    shape: int
    colour: int
    pattern: int
    part_kind: int
    part_colour: int
    part_size: int
    part_side: int
    base: int

    @property
    def attributes(self) -> tuple[int, ...]:
        return tuple(getattr(self, factor) for factor, _ in FACTORS)

    def part_phrases(self) -> list[tuple[str, str]]:
        """(descriptor phrase, the part it names: "body" | "part" | "base"), in a fixed order."""
        colour, part_colour = COLOUR_NAMES[self.colour], COLOUR_NAMES[self.part_colour]
        phrases = [(f"{_article(SHAPES[self.shape])} {SHAPES[self.shape]} body", "body"),
                   (f"{_article(colour)} {colour} body", "body"),
                   (f"has {_article(PATTERNS[self.pattern])} {PATTERNS[self.pattern]} body", "body"),
                   (f"a {PART_SIZES[self.part_size]} {part_colour} {PART_KINDS[self.part_kind]} "
                    f"{_SIDE_PHRASES[PART_SIDES[self.part_side]]}", "part")]
        if BASES[self.base] != "none":
            phrases.append((_BASE_PHRASES[BASES[self.base]], "base"))
        return phrases

    @property
    def descriptors(self) -> list[str]:
        """The class's 4-5 descriptor phrases (the zero-shot descriptor file's entry)."""
        return [phrase for phrase, _ in self.part_phrases()]


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """The seen (training) and novel (zero-shot only) classes, each list sorted by name."""
    seen: tuple[ConceptClass, ...]
    novel: tuple[ConceptClass, ...]

    def classes(self, split: str) -> tuple[ConceptClass, ...]:
        if split not in ("seen", "novel"):
            raise ValueError(f"class split must be 'seen' or 'novel', got {split!r}")
        return self.seen if split == "seen" else self.novel

    def class_names(self, split: str) -> list[str]:
        """Class names in label order (= sorted = ImageFolder folder order)."""
        return [c.name for c in self.classes(split)]

    def descriptors(self, split: str) -> dict[str, list[str]]:
        """`{class_name: [descriptor, ...]}` in label order (the zero-shot descriptor JSON)."""
        return {c.name: c.descriptors for c in self.classes(split)}


def _made_up_names(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct pronounceable non-words (CVCV or CVCVC: 2-3 BPE tokens, so captions stay
    short) free of attribute words."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    while len(names) < count:
        name = "".join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
                       for _ in range(2))
        if rng.random() < 0.5:
            name += consonants[rng.integers(len(consonants))]
        if name not in names and not any(word in name for word in ATTRIBUTE_WORDS):
            names.append(name)
    return names


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of differing part values between the attribute rows of a [N, F] and b [M, F] -> [N, M]."""
    return (a[:, None, :] != b[None, :, :]).sum(-1)


@functools.lru_cache(maxsize=8)
def catalogue(seed: int = 0, num_seen_classes: int = 40, num_novel_classes: int = 10) -> Catalogue:
    """The deterministic class catalogue of a seed.

    Seen classes use every value of every factor (each value is assigned to about
    num_seen/num_values classes) and differ pairwise in >= 2 part values. Novel classes are
    combinations at distance >= 2 from every seen class and >= 3 from each other, so each is a
    new combination of part values that all occur in training.
    """
    max_values = max(n for _, n in FACTORS)
    if num_seen_classes < max_values or num_novel_classes < 2:
        raise ValueError(f"need num_seen_classes >= {max_values} (to show every part value) and "
                         f"num_novel_classes >= 2, got {num_seen_classes}, {num_novel_classes}")
    rng = np.random.default_rng([seed, 0xC1A55])
    for _ in range(1000):  # rejection sampling; a handful of tries suffices for the defaults
        seen = np.stack([rng.permutation(np.resize(np.arange(n), num_seen_classes)) for _, n in FACTORS], 1)
        close = _distances(seen, seen) < 2
        if not close[~np.eye(num_seen_classes, dtype=bool)].any():
            break
    else:
        raise ValueError(f"cannot draw {num_seen_classes} seen classes differing in >= 2 part values")
    novel = np.zeros((0, len(FACTORS)), np.int64)
    for _ in range(100_000):
        if len(novel) == num_novel_classes:
            break
        candidate = np.array([[rng.integers(n) for _, n in FACTORS]])
        if _distances(candidate, seen).min() >= 2 and (not len(novel) or _distances(candidate, novel).min() >= 3):
            novel = np.concatenate([novel, candidate])
    else:
        raise ValueError(f"cannot draw {num_novel_classes} novel classes")
    names = _made_up_names(rng, num_seen_classes + num_novel_classes)

    def make(rows: np.ndarray, class_names: Sequence[str]) -> tuple[ConceptClass, ...]:
        return tuple(sorted((ConceptClass(name, *map(int, row)) for name, row in zip(class_names, rows)),
                            key=lambda c: c.name))

    return Catalogue(make(seen, names[:num_seen_classes]), make(novel, names[num_seen_classes:]))


# ----------------------------------------------------------------------------------------------
# Drawing: objects in frame coordinates (u, v in [0, 1] over a square frame of side s pixels)
# ----------------------------------------------------------------------------------------------

BODY_BOX = (0.3, 0.3, 0.7, 0.75)  # u1, v1, u2, v2 of the body inside the frame
PART_EXTENT = (0.2, 0.28)  # side of the attached part (frame units) for small / large
# Every part covers at least one pixel centre down to the smallest frame (0.375 R, R >= 32, i.e.
# 12 px): leg / stand bars are >= 1 px wide, wheel radii and the small spike's inscribed circle
# >= sqrt(2)/2 px.
BASE_COLOUR = (45, 45, 45)
# Label values of the drawn-part maps.
BODY, BODY_MARK, PART, BASE = 1, 2, 3, 4
PART_NAMES = ("body", "part", "base")


def _inside(p, q):
    return (p >= 0) & (p <= 1) & (q >= 0) & (q <= 1)


def _disc(p, q):
    return (p - 0.5) ** 2 + (q - 0.5) ** 2 <= 0.25


def _draw_objects(classes: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: np.ndarray,
                  ) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Draws N objects, each on a local canvas just larger than its frame.

    Args:
      classes: [N, F] attribute rows (ConceptClass.attributes).
      x0, y0, size: float32 [N] frame origin and side in canvas pixels.

    Returns:
      pixels: (object index, y, x, label) int arrays [P] of every drawn pixel in canvas
        coordinates, label in BODY, BODY_MARK, PART, BASE;
      boxes: float [N, 3, 4] xyxy canvas pixels of the drawn body, part and base (base all zero
        if none).
    """
    n = len(classes)
    origin = np.stack([np.floor(x0), np.floor(y0)], 1).astype(np.int64)
    side = int(np.ceil(size.max())) + 2
    centres = np.arange(side, dtype=np.float32) + 0.5  # pixel centres are sampled
    u = ((origin[:, 0, None] + centres[None] - x0[:, None]) / size[:, None])[:, None, :]  # [N, 1, S]
    v = ((origin[:, 1, None] + centres[None] - y0[:, None]) / size[:, None])[:, :, None]  # [N, S, 1]
    shape, _, pattern, kind, _, part_size, part_side, base = (classes[:, i, None, None] for i in range(len(FACTORS)))

    # Body: the shape inscribed in BODY_BOX (it touches all four sides, so its box is BODY_BOX).
    bu1, bv1, bu2, bv2 = BODY_BOX
    p, q = (u - bu1) / (bu2 - bu1), (v - bv1) / (bv2 - bv1)
    box = _inside(p, q)
    body = np.select([shape == 0, shape == 1, shape == 2],  # round, square, triangular, else diamond
                     [_disc(p, q), box, box & (np.abs(p - 0.5) <= q / 2)],
                     box & (np.abs(p - 0.5) + np.abs(q - 0.5) <= 0.5))
    marks = np.select([pattern == 1, pattern == 2, pattern == 3],  # plain (0) has none
                      [np.floor(q * 4) % 2 == 1,                                              # stripes
                       (p * 3 % 1 - 0.5) ** 2 + (q * 3 % 1 - 0.5) ** 2 <= 0.09,              # spots
                       (np.floor(p * 4) + np.floor(q * 4)) % 2 == 1], False) & body      # checks

    # Attached part: a square of side `extent` touching the body's top / left / right side.
    extent = np.asarray(PART_EXTENT, np.float32)[part_size]
    centre_v = (bv1 + bv2) / 2
    pu = np.select([part_side == 0, part_side == 1], [0.5 - extent / 2, bu1 - extent], bu2)  # top, left, right
    pv = np.where(part_side == 0, bv1 - extent, centre_v - extent / 2)
    p, q = (u - pu) / extent, (v - pv) / extent
    box = _inside(p, q)
    spike = np.select([part_side == 0, part_side == 1],  # a triangle pointing away from the body
                      [np.abs(p - 0.5) <= q / 2, np.abs(q - 0.5) <= p / 2], np.abs(q - 0.5) <= (1 - p) / 2)
    part = np.select([kind == 0, kind == 1], [_disc(p, q), box & spike], box)  # disc, spike, block

    legs = (v >= bv2) & (v <= 0.95) & (((u >= 0.36) & (u <= 0.45)) | ((u >= 0.55) & (u <= 0.64)))
    wheels = ((u - 0.38) ** 2 + (v - 0.87) ** 2 <= 0.0064) | ((u - 0.62) ** 2 + (v - 0.87) ** 2 <= 0.0064)
    stand = (u >= 0.32) & (u <= 0.68) & (v >= bv2) & (v <= 0.84)
    base_mask = np.select([base == 1, base == 2, base == 3], [legs, wheels, stand], False)  # 0: none

    labels = np.zeros((n, side, side), np.uint8)
    for value, mask in ((BODY, body), (BODY_MARK, marks), (PART, part), (BASE, base_mask)):
        labels[mask] = value
    # Boxes of the pixels each part finally shows (a later part wins a shared boundary pixel).
    boxes = np.zeros((n, 3, 4), np.float64)
    for k, drawn in enumerate(((labels == BODY) | (labels == BODY_MARK), labels == PART, labels == BASE)):
        cols, rows = drawn.any(1), drawn.any(2)  # [N, S]
        present = cols.any(1)
        missing = ~present & (base[:, 0, 0] > 0 if k == 2 else True)
        if missing.any():
            raise ValueError(f"an object of {size[missing].min():.1f} px is too small to draw its "
                             f"{PART_NAMES[k]}; use a larger resolution")
        x1, x2 = cols.argmax(1), side - cols[:, ::-1].argmax(1)
        y1, y2 = rows.argmax(1), side - rows[:, ::-1].argmax(1)
        boxes[:, k] = np.where(present[:, None], np.stack([x1, y1, x2, y2], 1) + np.tile(origin, 2), 0)
    index, y, x = np.nonzero(labels)
    return (index, y + origin[index, 1], x + origin[index, 0], labels[index, y, x]), boxes


def _draw_all(classes: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: np.ndarray, resolution: int,
              ) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """`_draw_objects` in two groups, small and large frames: the local canvases of the many
    small objects then stay small (the work is N x canvas pixels)."""
    pixels, boxes = [], np.zeros((len(classes), 3, 4))
    for group in (np.flatnonzero(size <= resolution / 2), np.flatnonzero(size > resolution / 2)):
        if len(group):
            (index, *rest), boxes[group] = _draw_objects(classes[group], x0[group], y0[group], size[group])
            pixels.append((group[index], *rest))
    return tuple(np.concatenate(column) for column in zip(*pixels)), boxes


def _palettes(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 5, 3] colour of each label value per object (class colours, jittered per object)."""
    colours = np.asarray(list(COLOURS.values()), np.int64)
    jitter = rng.integers(-12, 13, (len(classes), 2, 3))
    body = colours[classes[:, FACTOR_INDEX["colour"]]] + jitter[:, 0]
    palette = np.zeros((len(classes), 5, 3), np.int64)
    palette[:, BODY], palette[:, BODY_MARK] = body, body * 0.45  # pattern marks: a dark shade of the body
    palette[:, PART] = colours[classes[:, FACTOR_INDEX["part_colour"]]] + jitter[:, 1]
    palette[:, BASE] = BASE_COLOUR
    return np.clip(palette, 0, 255).astype(np.uint8)


def _backgrounds(rng: np.random.Generator, count: int, resolution: int) -> np.ndarray:
    """uint8 [count, R, R, 3]: light, low-saturation two-colour gradients at a random angle, plus noise."""
    grey = rng.uniform(150, 235, (count, 2, 1))
    ends = (grey + rng.uniform(-18, 18, (count, 2, 3))).astype(np.float32)  # a slight tint
    angle = rng.uniform(0, 2 * np.pi, (count, 1, 1)).astype(np.float32)
    axis = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    t = np.cos(angle) * axis[None, None, :] + np.sin(angle) * axis[None, :, None]
    t = (t / np.sqrt(np.float32(0.5)) + 1) / 2  # [count, R, R] in [0, 1]
    noise = rng.integers(-6, 7, (count, resolution, resolution), dtype=np.int8).astype(np.float32)
    image = np.empty((count, resolution, resolution, 3), np.uint8)
    for c in range(3):  # channel by channel: several times faster than broadcasting over [..., 3]
        start, delta = ends[:, 0, c, None, None], (ends[:, 1, c] - ends[:, 0, c])[:, None, None]
        image[..., c] = np.clip(start + delta * t + noise, 0, 255)
    return image


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------

CELLS = ("top left", "top right", "bottom left", "bottom right")
NUM_OBJECT_PROBS = (0.4, 0.35, 0.25)  # 1, 2, 3 objects per training scene
CHUNK = 256  # scenes drawn together; chunk k always uses the same random stream
SPLIT_STREAMS = {"train": 1, "validation": 2, "seen": 3, "novel": 4}
BACKGROUND_WORDS = ("softly shaded", "smooth gradient", "slightly grainy", "pale, evenly lit", "muted")


@dataclasses.dataclass
class SceneObject:
    concept: ConceptClass
    cell: str | None  # CELLS entry, None for a single object
    boxes: dict[str, list[float]]  # "object", "body", "part", ("base") -> normalised xyxy
    palette: np.ndarray  # uint8 [5, 3] colour per label value


@dataclasses.dataclass
class Scene:
    id: str
    image: np.ndarray  # uint8 [R, R, 3]
    objects: list[SceneObject]
    caption: str
    mllm_caption: str
    regions: list[dict]  # [{"description", "box" xyxy in [0, 1], "score"}]
    labels: np.ndarray | None = None  # uint8 [num_objects, R, R] label map of each object (with_labels)


def _layout(rng: np.random.Generator, num_objects: np.ndarray, resolution: int):
    """Frames of up to 3 objects per scene: (x0, y0, size) [C, 3] pixels and cell index [C, 3] (-1 none)."""
    count = len(num_objects)
    cells = np.argsort(rng.random((count, 4)), 1)[:, :3]  # distinct cells of the 2x2 grid
    half = resolution / 2
    size = np.where(num_objects[:, None] == 1, rng.uniform(0.5, 0.9, (count, 3)) * resolution,
                    rng.uniform(0.75, 1.0, (count, 3)) * half)
    room = np.where(num_objects[:, None] == 1, resolution, half) - size
    x0 = rng.random((count, 3)) * room + np.where(num_objects[:, None] == 1, 0, (cells % 2) * half)
    y0 = rng.random((count, 3)) * room + np.where(num_objects[:, None] == 1, 0, (cells // 2) * half)
    cells = np.where(num_objects[:, None] == 1, -1, cells)
    return x0, y0, size, cells


def _names_in_cells(objects: Sequence[SceneObject]) -> list[str]:
    return [f"{_article(o.concept.name)} {o.concept.name}" + (f" at {o.cell}" if o.cell else "")
            for o in objects]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# How an MLLM words an object's look (holistic, no boxes, `look_phrase`): the base as a "standing on" phrase.
_BASE_LOOKS = {"legs": "on two thin legs", "wheels": "on two wheels", "stand": "on a flat stand"}
_GENERIC_NOUNS = ("object", "figure", "toy", "thing")
MLLM_CAPTION_STYLES = ("holistic", "names_only")
UNNAMED = "object"  # the "class name" of an unnamed object (`_unnamed_objects`) in every text
MENTION_PROB = 0.6  # each part value of an object is mentioned in its MLLM caption with this probability
WRONG_PROB = 0.1  # a mentioned value is a wrong one (MLLM hallucination) with this probability
NAME_PROB = 0.5  # the MLLM caption calls an object by its class name (else a generic noun)


LOOK_FACTORS = ("colour", "pattern", "shape", "part", "base")  # in the order a look words them


def look_phrase(concept: ConceptClass, noun: str, factors: Sequence[str] = LOOK_FACTORS, brief: bool = False) -> str:
    """How an MLLM words an object's look: "a red, striped, square dafo with a small blue disc on top on two
    wheels", naming the `factors` (of LOOK_FACTORS; a base only if the object has one) of `concept`, calling
    it `noun`. `brief` words the attached part by colour and kind only ("with a blue disc")."""
    adjectives, tail = [], []
    for factor in (f for f in LOOK_FACTORS if f in factors):
        if factor == "colour":
            adjectives.append(COLOUR_NAMES[concept.colour])
        elif factor == "pattern":
            adjectives.append(PATTERNS[concept.pattern])
        elif factor == "shape":
            adjectives.append(SHAPES[concept.shape])
        elif factor == "part":
            kind, colour = PART_KINDS[concept.part_kind], COLOUR_NAMES[concept.part_colour]
            size, side = PART_SIZES[concept.part_size], _SIDE_PHRASES[PART_SIDES[concept.part_side]]
            tail.append(f"with {_article(colour)} {colour} {kind}" if brief else
                        f"with {_article(size)} {size} {colour} {kind} {side}")
        elif BASES[concept.base] != "none":
            tail.append(_BASE_LOOKS[BASES[concept.base]])
    words = ", ".join(adjectives) + (" " if adjectives else "") + noun
    return " ".join([f"{_article(words)} {words}", *tail])


def _look(rng: np.random.Generator, concept: ConceptClass, max_values: int, brief: bool) -> str:
    """One object's look as an MLLM describes it (`look_phrase`): a random subset (each value with
    MENTION_PROB, at most `max_values`) of the object's part values, each wrong with WRONG_PROB, in one
    holistic phrase: no box, no "body" phrases; the class name or, with 1 - NAME_PROB, a generic noun."""
    factors = [f for f in LOOK_FACTORS if f != "base" or BASES[concept.base] != "none"]
    mentioned = [factor for factor in factors if rng.random() < MENTION_PROB]
    mentioned = [mentioned[i] for i in sorted(rng.permutation(len(mentioned))[:max_values])]
    fields = {"part": ("part_kind", "part_colour", "part_size", "part_side")}

    def value(field: str) -> int:  # the true value, or with WRONG_PROB another one (a base is never "none")
        index, count, first = getattr(concept, field), dict(FACTORS)[field], int(field == "base")
        if rng.random() < WRONG_PROB:
            return first + int((index - first + rng.integers(1, count - first)) % (count - first))
        return index

    shown = dataclasses.replace(concept, **{field: value(field) for factor in mentioned
                                            for field in fields.get(factor, (factor,))})
    noun = concept.name if rng.random() < NAME_PROB else _GENERIC_NOUNS[rng.integers(len(_GENERIC_NOUNS))]
    return look_phrase(shown, noun, mentioned, brief)


def _captions(rng: np.random.Generator, mllm_rng: np.random.Generator, objects: Sequence[SceneObject],
              mllm_style: str = "holistic") -> tuple[str, str]:
    """(alt-text caption, MLLM-style caption); the MLLM caption draws from its own stream `mllm_rng`, so
    that the caption style changes nothing else in a scene.

    The alt-text caption names the classes and their layout only. The MLLM caption ("holistic", what
    LLaVA-style captions are like) describes each object's look with some of its part values (a few
    wrong), without boxes, so part words reach the image embedding only as a whole-image bag; the
    part knowledge stays *localised* only in the region descriptions. "names_only" (the strict
    ablation) words names, count, layout and background but never a part or attribute word.
    """
    if mllm_style not in MLLM_CAPTION_STYLES:
        raise ValueError(f"mllm_captions must be one of {MLLM_CAPTION_STYLES}, got {mllm_style!r}")
    named = _names_in_cells(objects)
    if len(objects) == 1:
        name = objects[0].concept.name
        caption = [f"{_article(name)} {name}", f"a photo of {_article(name)} {name}", name,
                   f"my {name}", f"{name} for sale"][rng.integers(5)]
    else:
        caption = [_join(named), ", ".join(o.concept.name for o in objects),
                   f"photo of {_join(named)}"][rng.integers(3)]
    if mllm_style == "holistic":
        # Fewer and briefer values per object in busier scenes: the demo's captions are 32 tokens.
        looks = [_look(mllm_rng, o.concept, max_values=(5, 2, 1)[len(objects) - 1], brief=len(objects) > 1)
                 for o in objects]
        mllm = (f"The image shows {looks[0]}." if len(objects) == 1
                else f"{('Two', 'Three')[len(objects) - 2]} objects: {_join(looks)}.")
        return caption, mllm
    background = BACKGROUND_WORDS[mllm_rng.integers(len(BACKGROUND_WORDS))]
    if len(objects) == 1:
        mllm = f"The image shows a single {name} standing against a {background} background."
    else:  # three objects leave no room for the background within 32 tokens
        mllm = (f"Two objects are visible: {_join(named)}, on a {background} background." if len(objects) == 2
                else f"Three objects: {_join(named)}.")
    return caption, mllm


def _regions(rng: np.random.Generator, objects: Sequence[SceneObject], max_regions: int) -> list[dict]:
    """Up to `max_regions` grounded phrases of the scene, chosen at random, with detector-like scores."""
    candidates = []
    for o in objects:
        candidates.append((f"{_article(o.concept.name)} {o.concept.name}", o.boxes["object"]))
        candidates += [(phrase, o.boxes[part]) for phrase, part in o.concept.part_phrases()]
    chosen = rng.permutation(len(candidates))[:max_regions]
    scores = np.sort(rng.uniform(0.3, 1.0, len(chosen)))[::-1]
    return [{"description": candidates[i][0], "box": candidates[i][1], "score": round(float(s), 4)}
            for i, s in zip(chosen, scores)]


def generate_scenes(split: str, start: int, count: int, *, resolution: int = 64, seed: int = 0,
                    num_seen_classes: int = 40, num_novel_classes: int = 10, max_regions: int = 5,
                    mllm_captions: str = "holistic", unnamed_prob: float = 0.0, with_labels: bool = False
                    ) -> list[Scene]:
    """Scenes `start .. start+count-1` of a split, identical however the range is cut.

    Splits: "train" / "validation" (1-3 objects of seen classes, all texts), "seen" / "novel"
    (one object per image, class index = scene index % number of classes, for zero-shot tests).
    `mllm_captions`: "holistic" or "names_only" (see `_captions`). `unnamed_prob`: the probability that a
    training / validation object is an unnamed one instead (see `_unnamed_objects`); 0 draws nothing, so
    the scenes are those of a world without them. `with_labels` keeps each object's label map (tests check
    boxes against drawn pixels).
    """
    _check_unnamed_prob(unnamed_prob)
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be one of {list(SPLIT_STREAMS)}, got {split!r}")
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32 so that every part is visible, got {resolution}")
    cat = catalogue(seed, num_seen_classes, num_novel_classes)
    classes = cat.classes("novel" if split == "novel" else "seen")
    attributes = np.array([c.attributes for c in classes])
    scenes: list[Scene] = []
    first_chunk, last_chunk = start // CHUNK, (start + count - 1) // CHUNK
    for chunk in range(first_chunk, last_chunk + 1):
        chunk_scenes = _chunk_scenes(split, chunk, classes, attributes, resolution, seed, max_regions, mllm_captions,
                                     with_labels, unnamed_prob, cat)
        scenes += [s for i, s in enumerate(chunk_scenes, chunk * CHUNK) if start <= i < start + count]
    return scenes


def _check_unnamed_prob(unnamed_prob: float) -> None:
    if not 0.0 <= unnamed_prob < 1.0:
        raise ValueError(f"unnamed_prob must be in [0, 1), got {unnamed_prob}")


def _unnamed_objects(rng: np.random.Generator, unnamed_prob: float, cat: Catalogue) -> tuple[np.ndarray, np.ndarray]:
    """Which of a chunk's [CHUNK, 3] object slots hold an unnamed object, and its part values [CHUNK, 3, F].

    An unnamed object is what web captions describe without a name the model knows: a random combination
    of part values, never a seen class and at distance >= 2 from every novel class (so that novel
    combinations still never occur in training), called UNNAMED in every text. It gives the part words
    combinations beyond the 40 seen classes, which the seen classes alone cannot (diagnosed in
    docs/synthetic-benchmark.md: without them every part word is learnt as a set of seen classes).
    """
    unnamed = rng.random((CHUNK, 3)) < unnamed_prob
    seen = np.array([c.attributes for c in cat.seen])
    novel = np.array([c.attributes for c in cat.novel])
    rows = np.zeros((CHUNK * 3, len(FACTORS)), np.int64)
    todo = np.arange(CHUNK * 3)
    while len(todo):  # rejection sampling: under 1% of random combinations is rejected
        candidates = np.stack([rng.integers(n, size=len(todo)) for _, n in FACTORS], 1)
        ok = (_distances(candidates, seen).min(1) >= 1) & (_distances(candidates, novel).min(1) >= 2)
        rows[todo[ok]] = candidates[ok]
        todo = todo[~ok]
    return unnamed, rows.reshape(CHUNK, 3, len(FACTORS))


def _chunk_scenes(split: str, chunk: int, classes: Sequence[ConceptClass], attributes: np.ndarray,
                  resolution: int, seed: int, max_regions: int, mllm_captions: str, with_labels: bool,
                  unnamed_prob: float, cat: Catalogue) -> list[Scene]:
    """All CHUNK scenes of one chunk, from the chunk's own random streams."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], chunk])
    mllm_rng = np.random.default_rng([seed, SPLIT_STREAMS[split], chunk, 1])
    indices = np.arange(chunk * CHUNK, (chunk + 1) * CHUNK)
    scene_level = split in ("train", "validation")
    num_objects = (rng.choice(3, CHUNK, p=NUM_OBJECT_PROBS) + 1) if scene_level else np.ones(CHUNK, np.int64)
    class_index = (rng.integers(len(classes), size=(CHUNK, 3)) if scene_level
                   else np.repeat((indices % len(classes))[:, None], 3, 1))
    x0, y0, size, cells = _layout(rng, num_objects, resolution)
    images = _backgrounds(rng, CHUNK, resolution)
    present = np.arange(3)[None] < num_objects[:, None]  # [C, 3]
    scene_of, slot = np.nonzero(present)
    slot_attributes = attributes[class_index]  # [C, 3, F]
    unnamed = np.zeros((CHUNK, 3), bool)
    if scene_level and unnamed_prob > 0:  # its own stream: the other draws are those of a world without them
        unnamed, random_rows = _unnamed_objects(np.random.default_rng([seed, SPLIT_STREAMS[split], chunk, 2]),
                                                unnamed_prob, cat)
        slot_attributes = np.where(unnamed[..., None], random_rows, slot_attributes)
    obj_classes = slot_attributes[scene_of, slot]
    (index, y, x, value), boxes = _draw_all(obj_classes, x0[scene_of, slot].astype(np.float32),
                                            y0[scene_of, slot].astype(np.float32),
                                            size[scene_of, slot].astype(np.float32), resolution)
    palettes = _palettes(obj_classes, rng)
    images[scene_of[index], y, x] = palettes[index, value]  # objects never share a pixel
    if with_labels:
        labels = np.zeros((len(scene_of), resolution, resolution), np.uint8)
        labels[index, y, x] = value
    boxes = np.clip(boxes / resolution, 0.0, 1.0)

    objects: list[list[SceneObject]] = [[] for _ in range(CHUNK)]
    object_labels: list[list[np.ndarray]] = [[] for _ in range(CHUNK)]
    for k, (i, j) in enumerate(zip(scene_of, slot)):
        part_boxes = {name: boxes[k, p].tolist() for p, name in enumerate(PART_NAMES) if boxes[k, p, 2] > 0}
        union = boxes[k][[p for p, name in enumerate(PART_NAMES) if name in part_boxes]]
        part_boxes["object"] = [*union[:, :2].min(0).tolist(), *union[:, 2:].max(0).tolist()]
        cell = CELLS[cells[i, j]] if cells[i, j] >= 0 else None
        concept = (ConceptClass(UNNAMED, *map(int, slot_attributes[i, j])) if unnamed[i, j]
                   else classes[class_index[i, j]])
        objects[i].append(SceneObject(concept, cell, part_boxes, palettes[k]))
        if with_labels:
            object_labels[i].append(labels[k])

    scenes = []
    for i, index in enumerate(indices):
        caption, mllm = _captions(rng, mllm_rng, objects[i], mllm_captions)
        regions = _regions(rng, objects[i], max_regions)
        scenes.append(Scene(f"synthetic-{split}-{index:07d}", images[i], objects[i], caption, mllm, regions,
                            np.stack(object_labels[i]) if with_labels else None))
    return scenes


class _RawExamples:
    """A split's raw examples (the prepare contract), generated lazily chunk by chunk."""

    def __init__(self, split: str, count: int, generator_args: dict):
        self.split, self.count, self.generator_args = split, count, generator_args

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, self.count, CHUNK):
            for scene in generate_scenes(self.split, start, min(CHUNK, self.count - start), **self.generator_args):
                yield {"id": scene.id, "image": scene.image, "caption": scene.caption,
                       "mllm_caption": scene.mllm_caption, "regions": scene.regions}


def raw_splits(num_train: int = 20000, num_validation: int = 1000, *, resolution: int = 64, seed: int = 0,
               num_seen_classes: int = 40, num_novel_classes: int = 10, max_regions: int = 5,
               mllm_captions: str = "holistic", unnamed_prob: float = 0.0) -> dict:
    """`{"train": ..., "validation": ...}` iterables (with len) of raw examples for `prepare_dataset`.

    A raw example is `{"id", "image": uint8 [R, R, 3], "caption", "mllm_caption",
    "regions": [{"description", "box": xyxy in [0, 1], "score"}]}`.
    """
    args = dict(resolution=resolution, seed=seed, num_seen_classes=num_seen_classes,
                num_novel_classes=num_novel_classes, max_regions=max_regions, mllm_captions=mllm_captions,
                unnamed_prob=unnamed_prob)
    return {"train": _RawExamples("train", num_train, args),
            "validation": _RawExamples("validation", num_validation, args)}


# ----------------------------------------------------------------------------------------------
# The cached benchmark directory
# ----------------------------------------------------------------------------------------------

MARKER_FILE = "synthetic.json"
ZEROSHOT_DIR = "zeroshot"


def _write_zeroshot(directory: str, split: str, per_class: int, generator_args: dict) -> None:
    """`DIR/zeroshot/<split>/<class>/NNNN.jpg` + `DIR/zeroshot/descriptors_<split>.json`."""
    cat = catalogue(generator_args["seed"], generator_args["num_seen_classes"], generator_args["num_novel_classes"])
    classes = cat.classes(split)
    for concept in classes:
        os.makedirs(os.path.join(directory, ZEROSHOT_DIR, split, concept.name))
    for scene_index, scene in enumerate(generate_scenes(split, 0, per_class * len(classes), **generator_args)):
        path = os.path.join(directory, ZEROSHOT_DIR, split, scene.objects[0].concept.name,
                            f"{scene_index // len(classes):04d}.jpg")
        Image.fromarray(scene.image).save(path, "JPEG", quality=95)
    with open(os.path.join(directory, ZEROSHOT_DIR, f"descriptors_{split}.json"), "w") as f:
        json.dump(cat.descriptors(split), f, indent=1)


def _read_marker(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, MARKER_FILE)) as f:
            return json.load(f).get("arguments")
    except (OSError, ValueError, AttributeError):
        return None


def ensure_synthetic(directory: str | os.PathLike, num_train: int = 20000, num_validation: int | None = None,
                     num_test_per_class: int | None = None, resolution: int = 64, seed: int = 0,
                     num_seen_classes: int = 40, num_novel_classes: int = 10, max_boxes: int = 5,
                     mllm_captions: str = "holistic", unnamed_prob: float = 0.0, num_workers: int | None = None) -> str:
    """Generates the benchmark into `directory` unless it already holds it with these arguments.

    Args:
      directory: the prepared directory to create (a TFDS folder with splits train/validation,
        plus `zeroshot/`). An existing one made with other arguments is replaced; an existing
        non-empty directory that is not a synthetic benchmark is refused.
      num_train / num_validation: scenes per split (validation default: num_train // 20, >= 16).
      num_test_per_class: zero-shot images per class (default: num_train // 400 within [4, 50]).
      resolution: image side in pixels (>= 32).
      seed: everything (classes, names, scenes) is a function of the seed and the sizes.
      num_seen_classes / num_novel_classes: catalogue size.
      max_boxes: regions per training image.
      mllm_captions: "holistic" (MLLM captions mention some part values of each object, as real
        ones do) or "names_only" (the strict ablation: no part or attribute word in any caption).
      unnamed_prob: probability that a training / validation object is an unnamed random combination of
        part values (``generate_scenes``); the zero-shot splits do not change.
      num_workers: prepare worker processes (default: all cores, or none for <= 2000 scenes,
        where starting workers costs more than it saves); does not change the output.

    Returns:
      `directory` as a string. Writing goes to a temporary sibling directory that is renamed
      into place when complete, so `directory` is never half-written.
    """
    from grain_jax.data import prepare  # noqa: PLC0415  (tfds import, only needed to write)

    directory = os.path.abspath(os.fspath(directory))
    num_validation = max(16, num_train // 20) if num_validation is None else num_validation
    num_test_per_class = int(np.clip(num_train // 400, 4, 50)) if num_test_per_class is None else num_test_per_class
    if min(num_train, num_validation, num_test_per_class) < 1:
        raise ValueError(f"sizes must be >= 1, got num_train={num_train}, num_validation={num_validation}, "
                         f"num_test_per_class={num_test_per_class}")
    arguments = dict(num_train=num_train, num_validation=num_validation, num_test_per_class=num_test_per_class,
                     resolution=resolution, seed=seed, num_seen_classes=num_seen_classes,
                     num_novel_classes=num_novel_classes, max_boxes=max_boxes, mllm_captions=mllm_captions)
    if unnamed_prob:  # recorded only when used, so that caches of worlds without unnamed objects stay valid
        arguments["unnamed_prob"] = unnamed_prob
    if mllm_captions not in MLLM_CAPTION_STYLES:
        raise ValueError(f"mllm_captions must be one of {MLLM_CAPTION_STYLES}, got {mllm_captions!r}")
    _check_unnamed_prob(unnamed_prob)
    existing = _read_marker(directory)
    if existing == arguments:
        return directory
    if existing is None and os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"{directory} exists, is not empty and holds no synthetic benchmark ({MARKER_FILE}); "
                         "give an empty or new directory")

    if num_workers is None and num_train + num_validation <= 2000:
        num_workers = 0
    generator_args = dict(resolution=resolution, seed=seed, num_seen_classes=num_seen_classes,
                          num_novel_classes=num_novel_classes)
    cat = catalogue(seed, num_seen_classes, num_novel_classes)  # validates the catalogue arguments early
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        prepare.prepare_dataset(raw_splits(num_train, num_validation, max_regions=max_boxes,
                                           mllm_captions=mllm_captions, unnamed_prob=unnamed_prob, **generator_args),
                                staging, resolution=resolution, max_boxes=max_boxes, num_workers=num_workers,
                                source="synthetic", extra_info={"synthetic": arguments})
        for split in ("seen", "novel"):
            _write_zeroshot(staging, split, num_test_per_class, generator_args)
        marker = {"arguments": arguments,
                  "classes": {split: [dict(dataclasses.asdict(c), descriptors=c.descriptors)
                                      for c in cat.classes(split)] for split in ("seen", "novel")}}
        with open(os.path.join(staging, MARKER_FILE), "w") as f:  # written last: marks a complete directory
            json.dump(marker, f, indent=1)
        _replace_directory(staging, directory, arguments)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"synthetic benchmark ready in {directory}: train {num_train}, validation {num_validation}, "
          f"zero-shot {len(cat.seen)} seen / {len(cat.novel)} novel classes x {num_test_per_class} images",
          flush=True)
    return directory


def _replace_directory(staging: str, directory: str, arguments: dict) -> None:
    """Renames `staging` to `directory`, moving an outdated `directory` away first.

    Another process may finish the same benchmark concurrently: then its result is kept.
    """
    if os.path.exists(directory):
        if _read_marker(directory) == arguments:
            return
        outdated = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
        os.replace(directory, os.path.join(outdated, "benchmark"))
        shutil.rmtree(outdated, ignore_errors=True)
    try:
        os.rename(staging, directory)
    except OSError:
        if _read_marker(directory) != arguments:  # not a concurrent writer's identical result
            raise
