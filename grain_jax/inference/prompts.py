"""Prompt templates for zero-shot classification, selectable by name.

* ``ref46``: the 46 templates of the GRAIN reference code (each ends with a comma so a
  descriptor sentence can follow; 23 of them say "a type of bird" and one has a double
  space, both kept for parity even though the reference uses them for every dataset).
* ``clip80``: the 80 templates of the CLIP paper's ImageNet ensemble.
* ``short``: a handful of generic templates (fast, for in-training evaluation).
* ``per_dataset``: a small set worded for each dataset (the fix for the bird templates
  being used everywhere); datasets without their own set fall back to ``short``.

Templates contain one ``{}`` for the class name. ``remove_name`` takes the class name out of a class's
prompts (the evaluators' ``name_free`` metrics): a made-up or untrained name can decide a zero-shot
argmax by itself (docs/synthetic-benchmark.md).
"""
from __future__ import annotations

import re

REFERENCE_46 = (
    "a bad photo of a {},", "a photo of many {},", "a photo of the hard to see {},",
    "a low resolution photo of the {}, a type of bird,", "a rendering of a {},",
    "a bad photo of the {}, a type of bird,", "a cropped photo of the {}, a type of bird,",
    "a photo of a hard to see {},", "a bright photo of a {},", "a photo of a clean {},",
    "a photo of a dirty {},", "a drawing of a {},", "a photo of my {}, a type of bird,",
    "a photo of the cool {},", "a close-up photo of a {},",
    "a black and white photo of the {}, a type of bird,", "a painting of the {}, a type of bird,",
    "a painting of a {}, a type of bird,", "a bright photo of the {}, a type of bird,",
    "a cropped photo of a {},", "a plastic {}, a type of bird,", "a photo of the dirty {},",
    "a jpeg corrupted photo of a {}, a type of bird,", "a blurry photo of the {}, a type of bird,",
    "a photo of the {}, a type of bird,", "a good photo of the {}, a type of bird,",
    "a rendering of the {}, a type of bird,", "a {} in a video game, a type of bird,",
    "a photo of one {}, a type of bird,", "a close-up photo of the {}, a type of bird,",
    "a photo of a {}, a type of bird,", "a low resolution photo of a {}, a type of bird,",
    "a rendition of the {}, a type of bird,", "a photo of the clean {}, a type of bird,",
    "a rendition of a {},", "a photo of a nice {},", "a photo of a weird {},", "a blurry photo of a {},",
    "a good photo of a {},", "a plushie {}, a type of bird,", "a photo of the nice {},",
    "a photo of the weird {},", "a photo of the large {},", "a toy {}, a  type of bird,",
    "itap of my {},", "a photo of a cool {},",
)

CLIP_PAPER_80 = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

SHORT = ("a photo of a {},", "a photo of the {},", "a close-up photo of a {},", "a blurry photo of a {},")

_OBJECTS = ("a photo of a {},", "a photo of the small {},", "a photo of the large {},",
            "a blurry photo of a {},", "a low resolution photo of a {},")
_PLACES = ("a photo of a {},", "a photo of the {}, a type of place,", "a photo taken in a {},",
           "a wide photo of a {},")

PER_DATASET = {
    "imagenet2012": ("itap of a {},", "a bad photo of the {},", "a origami {},", "a photo of the large {},",
                     "a {} in a video game,", "art of the {},", "a photo of the small {},"),
    "cifar10": _OBJECTS,
    "cifar100": _OBJECTS,
    "sun397": _PLACES,
    "places365_small": _PLACES,
    "cars196": ("a photo of a {}, a type of car,", "a photo of my {},", "a photo of the {}, a car,",
                "a close-up photo of a {}, a type of car,"),
    "dtd": ("a photo of a {} texture,", "a photo of a {} pattern,", "a photo of a {} thing,",
            "a close-up photo of a {} surface,"),
    "oxford_iiit_pet": ("a photo of a {}, a type of pet,", "a photo of my {}, a type of pet,",
                        "a close-up photo of a {}, a type of pet,"),
    "caltech101": ("a photo of a {},", "a painting of a {},", "a drawing of a {},", "a photo of the {},"),
    "oxford_flowers102": ("a photo of a {}, a type of flower,", "a close-up photo of a {}, a type of flower,"),
    "caltech_birds2011": ("a photo of a {}, a type of bird,", "a close-up photo of a {}, a type of bird,",
                          "a photo of the {}, a type of bird,"),
    "food101": ("a photo of {}, a type of food,", "a close-up photo of {}, a type of food,"),
}
PER_DATASET["imagenet_v2"] = PER_DATASET["imagenet2012"]

NAMED = {"ref46": REFERENCE_46, "clip80": CLIP_PAPER_80, "short": SHORT}


def get_templates(name_or_list: str | tuple | list, dataset: str | None = None) -> tuple[str, ...]:
    """Templates by name (``ref46``, ``clip80``, ``short``, ``per_dataset``) or an explicit list.

    ``dataset`` picks the ``per_dataset`` set (TFDS catalog name, e.g. ``food101``).
    """
    if not isinstance(name_or_list, str):
        templates = tuple(name_or_list)
    elif name_or_list == "per_dataset":
        templates = PER_DATASET.get(dataset or "", SHORT)
    elif name_or_list in NAMED:
        templates = NAMED[name_or_list]
    else:
        raise ValueError(f"unknown template set {name_or_list!r}; use one of {sorted(NAMED) + ['per_dataset']} "
                         "or a list of strings with one '{{}}'")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"every template needs exactly one '{{}}' for the class name; bad: {bad or 'empty list'}")
    return templates


NEUTRAL_NAME = "object"  # what stands for the class name in name-free prompts


def remove_name(text: str, class_name: str, neutral: str = NEUTRAL_NAME) -> str:
    """``text`` with every mention of ``class_name`` replaced by ``neutral``.

    A mention is the whole name, case-insensitive, not part of a longer word ("bo" is replaced in
    "a bo's tail", not in "a bold body"); the words of a multi-word name may be separated by any
    whitespace. An article right before a mention agrees with ``neutral`` ("a bebo" -> "an object").
    """
    words = [re.escape(w) for w in class_name.split()]
    if not words:
        return text
    article = "an" if neutral[:1].lower() in "aeiou" else "a"

    def replace(mention: re.Match) -> str:
        said = mention.group("article")
        if not said:
            return neutral
        return (article.capitalize() if said[0].isupper() else article) + mention.group("space") + neutral

    pattern = r"(?<!\w)(?:(?P<article>an?)(?P<space>\s+))?" + r"\s+".join(words) + r"(?!\w)"
    return re.sub(pattern, replace, text, flags=re.IGNORECASE)
