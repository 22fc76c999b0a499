"""Zero-shot classification data: the TFDS catalog, ImageFolder directories, the synthetic benchmark.

Dataset specs (what ``--evals`` and ``zeroshot.Evaluator(datasets=...)`` take):

* a TFDS name from ``CATALOG`` (``imagenet2012``, ``cifar10``, ...), read as an ArrayRecord
  data source from ``data_dir`` (build once with
  ``tfds build <name> --data_dir DIR --file_format=array_record``; reading needs no TensorFlow);
* ``folder:PATH``: ImageFolder layout ``PATH/<class name>/*.jpg`` (classes = sorted
  sub-folder names), descriptors from ``PATH/descriptors.json`` or
  ``PATH/../descriptors_<folder name>.json`` when present;
* ``synthetic:seen`` / ``synthetic:novel``: the embedded benchmark's zero-shot splits
  (``DIR/zeroshot/{seen,novel}`` + ``descriptors_{seen,novel}.json``).

Every dataset is a ``ClassificationData`` whose ``source[i]`` is ``(uint8 [H, W, 3],
class index)``; index -1 marks an example outside the evaluated classes (e.g. Caltech's
background class), which is never counted.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from grain_jax.data import images
from grain_jax.inference import descriptors as descriptors_lib


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """How to read one TFDS dataset for zero-shot evaluation.

    Attributes:
      split: the split the reference evaluates on (TFDS naming).
      descriptor_files: file names in the Menon & Vondrick release, tried in order.
      names_are_ids: TFDS label names are opaque ids (WordNet ids, "0".."199"): the
        descriptor file supplies the class names and only the class count is checked.
      ignore_labels: TFDS labels left out of the evaluation (not among the reference's classes).
      config: the TFDS builder config to read when several are prepared.
    """
    split: str
    descriptor_files: tuple[str, ...]
    names_are_ids: bool = False
    ignore_labels: tuple[str, ...] = ()
    config: str | None = None


CATALOG: dict[str, CatalogEntry] = {
    "imagenet2012": CatalogEntry("validation", ("descriptors_imagenet.json",), names_are_ids=True),
    "imagenet_v2": CatalogEntry("test", ("descriptors_imagenet.json",), names_are_ids=True,
                                config="matched-frequency"),
    "cifar10": CatalogEntry("test", ("descriptors_cifar10.json",)),
    "cifar100": CatalogEntry("test", ("descriptors_cifar100.json",)),
    "sun397": CatalogEntry("test", ("descriptors_sun.json", "descriptors_sun397.json"), config="standard-part1-120k"),
    "cars196": CatalogEntry("test", ("descriptors_cars.json", "descriptors_cars196.json")),
    "dtd": CatalogEntry("test", ("descriptors_dtd.json",)),
    "oxford_iiit_pet": CatalogEntry("test", ("descriptors_pets.json", "descriptors_oxford_iiit_pet.json")),
    "caltech101": CatalogEntry("test", ("descriptors_caltech.json", "descriptors_caltech101.json"),
                               ignore_labels=("background_google",)),
    "oxford_flowers102": CatalogEntry("test", ("descriptors_flowers.json", "descriptors_oxford_flowers102.json")),
    "caltech_birds2011": CatalogEntry("test", ("descriptors_cub.json", "descriptors_caltech_birds2011.json"),
                                      names_are_ids=True),
    "places365_small": CatalogEntry("validation", ("descriptors_places365.json", "descriptors_places365_small.json")),
    "food101": CatalogEntry("validation", ("descriptors_food101.json",)),
}
# The reference's "Average Accuracy" is over these 11 (ImageNet excluded).
ELEVEN = ("cifar10", "cifar100", "sun397", "cars196", "dtd", "oxford_iiit_pet", "caltech101",
          "oxford_flowers102", "caltech_birds2011", "places365_small", "food101")
ALL = ("imagenet2012",) + ELEVEN
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SKIPPED = -2  # class index of an example whose image could not be decoded (never counted, listed instead)


class NotPrepared(RuntimeError):
    """A TFDS dataset is missing (or not in ArrayRecord format) under the data dir."""


@dataclasses.dataclass
class ClassificationData:
    """One zero-shot dataset.

    Attributes:
      name: metric namespace (``cifar10``, ``synthetic_novel``, ``folder_<dir name>``).
      source: random access, ``source[i] -> (uint8 [H, W, 3], class index or -1)``.
      class_names: [C] names for the prompts, in class-index order.
      descriptors: ``{class_name: [descriptor, ...]}`` aligned with class_names, or None.
    """
    name: str
    source: Sequence
    class_names: list[str]
    descriptors: dict[str, list[str]] | None

    def __len__(self) -> int:
        return len(self.source)


class _TfdsSource:
    """A TFDS ArrayRecord data source mapped to (image, class index)."""

    def __init__(self, source, label_to_class: np.ndarray):
        self._source, self._label_to_class = source, label_to_class

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        example = self._source[index]
        return np.asarray(example["image"]), int(self._label_to_class[int(example["label"])])


class FolderSource:
    """ImageFolder files mapped to (image, class index); images decoded as RGB."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths, self.labels = list(paths), list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return images.read_rgb(self.paths[index]), self.labels[index]

    def describe(self, index: int) -> str:
        return self.paths[index]


def scan_image_folder(path: str) -> tuple[list[str], list[str], list[int]]:
    """(sorted class folder names, image paths, class indices) of an ImageFolder directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"folder dataset {path!r} does not exist")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(f"folder dataset {path!r} has no class sub-folders (expected PATH/<class>/*.jpg)")
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(path, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [os.path.join(path, name, f) for f in files]
        labels += [index] * len(files)
    if not paths:
        raise ValueError(f"folder dataset {path!r}: no images with extensions {IMAGE_EXTENSIONS}")
    return classes, paths, labels


def _folder_descriptor_file(path: str, descriptors: str | None) -> str | None:
    """First existing of: the ``descriptors`` file, ``descriptors/descriptors_<folder>.json``
    (``descriptors`` a directory), ``PATH/descriptors.json``, ``PATH/../descriptors_<folder>.json``."""
    base = os.path.basename(os.path.normpath(path))
    candidates = []
    if descriptors:
        if not os.path.exists(descriptors):
            raise FileNotFoundError(f"descriptors: {descriptors!r} does not exist")
        candidates.append(descriptors if os.path.isfile(descriptors)
                          else os.path.join(descriptors, f"descriptors_{base}.json"))
    candidates += [os.path.join(path, "descriptors.json"),
                   os.path.join(os.path.dirname(os.path.normpath(path)), f"descriptors_{base}.json")]
    return next((c for c in candidates if os.path.isfile(c)), None)


def folder_dataset(path: str, *, descriptors: str | None = None, name: str | None = None) -> ClassificationData:
    """An ImageFolder directory; descriptor keys must equal its class folder names."""
    classes, paths, labels = scan_image_folder(path)
    desc_file = _folder_descriptor_file(path, descriptors)
    desc = None
    class_names = [descriptors_lib.pretty_name(c) for c in classes]
    name = name or "folder_" + os.path.basename(os.path.normpath(path))
    if desc_file:
        class_names, desc = descriptors_lib.align(descriptors_lib.load(desc_file), classes,
                                                  source=f"{desc_file} vs folder {path}")
    else:
        logging.warning("%s: no descriptors file (%s/descriptors.json, or --descriptors): classes are scored by "
                        "their names alone, so there are no region (alpha < 1) results", name, path)
    return ClassificationData(name, FolderSource(paths, labels), class_names, desc)


def synthetic_dataset(split: str, synthetic_dir: str | None,
                      synthetic: Mapping[str, Any] | None = None) -> ClassificationData:
    """``synthetic:seen|novel``; generates the benchmark (``ensure_synthetic`` sizes ``synthetic``, default
    its defaults) into ``synthetic_dir`` if absent."""
    if split not in ("seen", "novel"):
        raise ValueError(f"synthetic split must be 'seen' or 'novel', got {split!r}")
    if not synthetic_dir:
        raise ValueError("synthetic:<split> needs synthetic_dir (--synthetic_dir), the grain-jax-prepare "
                         "synthetic output directory")
    if not os.path.isdir(os.path.join(synthetic_dir, "zeroshot", split)):
        from grain_jax.data import synthetic as synthetic_lib
        synthetic_dir = synthetic_lib.ensure_synthetic(synthetic_dir, **(synthetic or {}))
    return folder_dataset(os.path.join(synthetic_dir, "zeroshot", split), name=f"synthetic_{split}")


def default_data_dir(data_dir: str | None) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepared_directory(name: str, data_dir: str | None, config: str | None = None) -> str | None:
    """The newest ``DATA_DIR/<name>[/<config>]/<version>`` holding ``dataset_info.json``, or None."""
    root = os.path.join(default_data_dir(data_dir), name)
    found = [os.path.dirname(p) for depth in ("*", "*/*")
             for p in glob.glob(os.path.join(root, depth, "dataset_info.json"))]
    if config:
        found = [d for d in found if os.path.basename(os.path.dirname(d)) == config] or found

    def version(directory):
        return tuple(int(x) if x.isdigit() else -1 for x in os.path.basename(directory).split("."))
    return max(found, key=version) if found else None


def open_tfds(name: str, split: str, data_dir: str | None, config: str | None = None):
    """(random-access source, builder) of a prepared TFDS dataset, without TensorFlow.

    A prepared directory is opened from its metadata (``tfds.builder_from_directory``) so the
    dataset's builder code, which may import TensorFlow, is never loaded; otherwise the
    catalog builder is asked (this is also what ``tfds.testing.mock_data`` intercepts).
    Raises NotPrepared with the build command when neither works.
    """
    import tensorflow_datasets as tfds

    build = (f"tfds build {name} --file_format=array_record" + (f" --data_dir {data_dir}" if data_dir else "")
             + " (building needs TensorFlow: pip install tensorflow)")
    directory = prepared_directory(name, data_dir, config)
    try:
        if directory:
            builder = tfds.builder_from_directory(directory)
        else:
            builder = tfds.builder(name if not config else f"{name}/{config}", data_dir=data_dir)
        return builder.as_data_source(split), builder
    # What tfds raises for "not built here" varies: missing files, no ArrayRecord shards
    # (NotImplementedError for other file formats), unknown configs, builder code needing TF.
    except (AssertionError, FileNotFoundError, NotImplementedError, ValueError, ImportError, KeyError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise NotPrepared(f"{name}: not prepared: run {build}  ({reason})") from e


def tfds_dataset(name: str, *, data_dir: str | None, descriptors: str | None = None) -> ClassificationData:
    """A ``CATALOG`` dataset (raises NotPrepared if it is not built under ``data_dir``)."""
    if name not in CATALOG:
        raise ValueError(f"unknown zero-shot dataset {name!r}; known: {sorted(CATALOG)}, folder:PATH, "
                         "synthetic:seen|novel")
    entry = CATALOG[name]
    source, builder = open_tfds(name, entry.split, data_dir, entry.config)
    label_names = list(builder.info.features["label"].names)
    kept = [n for n in label_names if n not in entry.ignore_labels]
    label_to_class = np.full(len(label_names), -1, np.int64)
    label_to_class[[label_names.index(n) for n in kept]] = np.arange(len(kept))

    desc = None
    class_names = [descriptors_lib.pretty_name(n) for n in kept]
    if descriptors:
        desc_file = descriptors_lib.find_file(descriptors, entry.descriptor_files + (f"descriptors_{name}.json",))
        class_names, desc = descriptors_lib.align(descriptors_lib.load(desc_file), kept,
                                                  source=f"{desc_file} vs {name}", names_are_ids=entry.names_are_ids)
    elif entry.names_are_ids:
        raise ValueError(f"{name}: TFDS labels are ids ({label_names[:2]} ...); pass --descriptors with "
                         f"{entry.descriptor_files[0]} to give the class names")
    return ClassificationData(name, _TfdsSource(source, label_to_class), class_names, desc)


def classification_dataset(spec: str, *, data_dir: str | None = None, descriptors: str | None = None,
                           synthetic_dir: str | None = None,
                           synthetic: Mapping[str, Any] | None = None) -> ClassificationData:
    """Resolves a dataset spec (see module docstring); ``synthetic_dir`` / ``synthetic`` as in ``synthetic_dataset``."""
    if spec.startswith("folder:"):
        return folder_dataset(spec.split(":", 1)[1], descriptors=descriptors)
    if spec.startswith("synthetic:"):
        return synthetic_dataset(spec.split(":", 1)[1], synthetic_dir, synthetic)
    return tfds_dataset(spec, data_dir=data_dir, descriptors=descriptors)


def give_unique_name(data: ClassificationData, spec: str, taken: dict[str, str]) -> None:
    """Renames ``data`` to ``<name>_2``, ``_3``, ... if another spec already reports under its name
    (two ``folder:`` paths with the same last component), saying so; records it in ``taken``
    (``{name: spec}``)."""
    name, k = data.name, 2
    while data.name in taken:
        data.name, k = f"{name}_{k}", k + 1
    if data.name != name:
        print(f"{spec} is reported as {data.name} ({name} is {taken[name]})", flush=True)
    taken[data.name] = spec


def expand(specs: str | Sequence[str]) -> list[str]:
    """``"all"`` -> the 12 catalog datasets, ``"synthetic"`` -> both synthetic splits,
    otherwise a comma list / list of specs, kept in order."""
    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    out: list[str] = []
    for item in items:
        group = {"all": list(ALL), "synthetic": ["synthetic:seen", "synthetic:novel"]}.get(item, [item])
        out += [g for g in group if g not in out]
    return out
