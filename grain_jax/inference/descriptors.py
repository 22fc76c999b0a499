"""Class descriptors ("classify by description", Menon & Vondrick) and prompt building.

A descriptor file is JSON ``{class_name: [descriptor, ...], ...}``. The reference uses
the JSON key order as the class index without checking it against the dataset; here
``align`` matches keys to the dataset's label names (after ``canonical_name``) and
raises naming the missing / extra classes instead of silently misaligning.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, Sequence

Descriptors = dict[str, list[str]]


def descriptor_sentence(descriptor: str) -> str:
    """The reference's ``make_descriptor_sentence`` (eval version, leading space).

    Kept exactly for parity, including ``startswith("a")`` catching every word that
    begins with the letter a ("angular wings" -> " which is angular wings").
    """
    if descriptor.startswith("a"):
        return f" which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f" which {descriptor}"
    if descriptor.startswith("used"):
        return f" which is {descriptor}"
    return f" which has {descriptor}"


def class_prompts(class_name: str, descriptors: Sequence[str] | None, templates: Sequence[str]) -> list[str]:
    """Prompts whose embeddings are averaged into one class embedding.

    With descriptors: every descriptor x every template (descriptor-major, like the
    reference), ``template.format(name) + descriptor_sentence(d)``; a template ending
    in "." (clip80) has it turned into "," so the sentence reads on. Without (or with an
    empty list): the templates alone.
    """
    if not descriptors:
        return [t.format(class_name) for t in templates]
    heads = [t.format(class_name) for t in templates]
    heads = [h[:-1] + "," if h.endswith(".") else h for h in heads]
    return [h + descriptor_sentence(d) for d in descriptors for h in heads]


def load(path: str) -> Descriptors:
    """Reads and validates a descriptor JSON (key order preserved)."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object {{class_name: [descriptor, ...]}}")
    for name, descs in data.items():
        if not isinstance(descs, list) or not all(isinstance(d, str) and d.strip() for d in descs):
            raise ValueError(f"{path}: class {name!r} must map to a list of non-empty strings, got {descs!r}")
    return {name: [d.strip() for d in descs] for name, descs in data.items()}


def find_file(path: str, file_names: Sequence[str]) -> str:
    """``path`` itself if it is a file, else the first of ``file_names`` inside the directory ``path``."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"descriptors: {path!r} is neither a file nor a directory")
    for name in file_names:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"descriptors: none of {list(file_names)} in {path}")


def canonical_name(name: str) -> str:
    """Label name normalised for matching: "001.Black_footed_Albatross" -> "black footed albatross",
    "/a/airplane_cabin" -> "airplane cabin", "Abyssinian" -> "abyssinian"."""
    name = re.sub(r"^\d+\.", "", name.strip())          # CUB "001." prefixes
    name = re.sub(r"^/[a-z]/", "", name)                 # SUN / Places "/a/" prefixes
    name = re.sub(r"[_\-/]+", " ", name.lower())
    return re.sub(r"\s+", " ", name).strip()


def pretty_name(name: str) -> str:
    """A readable class name for prompts when no descriptor file provides one."""
    name = re.sub(r"^\d+\.", "", name.strip())
    name = re.sub(r"^/[a-z]/", "", name)
    return re.sub(r"\s+", " ", re.sub(r"[_/]+", " ", name)).strip()


def align(descriptors: Mapping[str, Sequence[str]], label_names: Sequence[str], *, source: str,
          names_are_ids: bool = False) -> tuple[list[str], Descriptors]:
    """Orders ``descriptors`` like the dataset's labels.

    Args:
      descriptors: as loaded.
      label_names: the dataset's class names in label-id order.
      source: dataset / file description for error messages.
      names_are_ids: the labels are opaque ids (ImageNet WordNet ids): only the class
        count can be checked and the file's key order is taken as the label order.

    Returns:
      (class names for the prompts in label order, descriptors keyed by them).
    """
    keys = list(descriptors)
    if names_are_ids:
        if len(keys) != len(label_names):
            raise ValueError(f"{source}: descriptor file has {len(keys)} classes but the dataset has "
                             f"{len(label_names)}")
        return keys, {k: list(descriptors[k]) for k in keys}
    by_canonical: dict[str, str] = {}
    for key in keys:
        c = canonical_name(key)
        if c in by_canonical:
            raise ValueError(f"{source}: descriptor classes {by_canonical[c]!r} and {key!r} collide")
        by_canonical[c] = key
    wanted = [canonical_name(n) for n in label_names]
    missing = [n for n, c in zip(label_names, wanted) if c not in by_canonical]
    extra = sorted(set(by_canonical) - set(wanted))
    if missing or extra:
        raise ValueError(f"{source}: descriptor classes do not match the dataset's labels; "
                         f"missing from the descriptors: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                         f"not in the dataset: {[by_canonical[c] for c in extra[:20]]}"
                         f"{' ...' if len(extra) > 20 else ''}")
    names = [by_canonical[c] for c in wanted]
    return names, {n: list(descriptors[n]) for n in names}
