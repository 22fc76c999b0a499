"""Zero-shot classification evaluator (top-1, top-5, mean per-class recall).

Class embeddings come from ``InferenceModel.classifier`` (templates x descriptor
sentences, the reference's recipe). Scores are ``alpha * global + (1 - alpha) * region``
(``alpha=1``: the reference's evaluate.py; ``alpha<1``: its our_eval.py region variant,
GRAIN + descriptors only). Metrics are fractions in [0, 1] named
``0shot/<dataset>/top1`` (plus ``0shot/<dataset>/alpha<a>/top1`` for each extra alpha).

``name_free/...`` (the synthetic benchmark by default): the same metrics with the class name replaced by
"object" in every prompt (``prompts.remove_name``), the same templates and descriptors otherwise. The
synthetic classes' names are made-up words no training text explains, and they, not the image, decide
much of the novel top-1 (docs/synthetic-benchmark.md); scored in the same image pass.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
from tqdm import tqdm

from grain_jax.evaluators import common, datasets as datasets_lib, per_process
from grain_jax.inference import classifier as classifier_lib
from grain_jax.inference import preprocess_image

METRICS = ("top1", "top5", "mean_per_class_recall")


class _Counts:
    """Running hit counts for one alpha."""

    def __init__(self, num_classes: int):
        self.top1 = self.top5 = 0
        self.class_hits = np.zeros(num_classes, np.int64)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        k = min(5, scores.shape[1])
        topk = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        hit1 = np.argmax(scores, axis=1) == labels
        self.top1 += int(hit1.sum())
        self.top5 += int((topk == labels[:, None]).any(1).sum())
        np.add.at(self.class_hits, labels[hit1], 1)

    def add_up(self, split: per_process.Split) -> None:
        """Every process's counts summed (``per_process.Split.sum``)."""
        self.top1, self.top5 = (int(n) for n in split.sum(np.array([self.top1, self.top5])))
        self.class_hits = split.sum(self.class_hits)

    def metrics(self, count: int, class_counts: np.ndarray) -> dict[str, float]:
        present = class_counts > 0
        return {"top1": self.top1 / count, "top5": self.top5 / count,
                "mean_per_class_recall": float(np.mean(self.class_hits[present] / class_counts[present]))}


# Synthetic / folder benchmarks, where grounding matters: also the region mix and the regions alone.
LOCAL_ALPHAS = (1.0, 0.5, 0.0)


def alpha_key(alpha: float) -> str:
    return "" if alpha == 1.0 else f"alpha{alpha:g}/"


def usable_alphas(model, data: datasets_lib.ClassificationData, alphas: Sequence[float] | None) -> tuple[float, ...]:
    """The score mixes to report: ``alphas`` (None: ``LOCAL_ALPHAS`` for ``synthetic_*`` /
    ``folder_*`` datasets, else global only), keeping only alpha=1 where region scoring is
    impossible (a CLIP model or a dataset without descriptors)."""
    if alphas is None:
        alphas = LOCAL_ALPHAS if data.name.startswith(("synthetic_", "folder_")) else (1.0,)
    if not model.has_grounding or data.descriptors is None:
        return (1.0,)
    return tuple(float(a) for a in alphas)


NAME_FREE = "name_free/"  # key prefix of the metrics with the class names replaced by "object"


def uses_name_free(data: datasets_lib.ClassificationData, name_free: bool | None) -> bool:
    """Whether to report the ``name_free/`` metrics: ``name_free``, or (None) for the synthetic benchmark only,
    whose names are made-up words; real class names ("tabby cat") are part of what a model should read."""
    return data.name.startswith("synthetic_") if name_free is None else bool(name_free)


def subset(num_examples: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
    """Indices of the examples to evaluate: all, or a fixed random subset of ``max_examples``
    (for quick in-training evaluation)."""
    indices = grain.MapDataset.range(num_examples)
    if max_examples is not None and max_examples < num_examples:
        indices = indices.seed(seed).shuffle()[:max_examples]
    return np.asarray(list(indices), np.int64)


def batches(data: datasets_lib.ClassificationData, model, indices: np.ndarray, batch_size: int, *,
            num_threads: int = 8, skipped: list | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images [batch_size, S, S, 3], class indices [batch_size]) of the examples ``indices``
    (a multiple of ``batch_size`` long), decoded and resized by ``num_threads`` grain threads.

    An example whose image cannot be decoded (truncated, empty, not an image) gets the class
    index ``datasets.SKIPPED`` and ``{"path", "reason"}`` appended to ``skipped``; a
    ``per_process.PADDING`` index gets class index ``PADDING``: neither is ever counted.
    """
    size = model.spec.image_size
    skipped = [] if skipped is None else skipped

    def load(index):
        if index == per_process.PADDING:
            return np.zeros((size, size, 3), np.uint8), np.int64(-1)
        example = common.read_example(data.source, index, data.name, skipped)
        if example is None:
            return np.zeros((size, size, 3), np.uint8), np.int64(datasets_lib.SKIPPED)
        return preprocess_image(example[0], model.spec), np.int64(example[1])

    ds = grain.MapDataset.source(indices).map(load).batch(batch_size)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    yield from ds.to_iter_dataset(read)


def evaluate(model, data: datasets_lib.ClassificationData, *, templates="ref46", renormalize: bool = False,
             alphas: Sequence[float] | None = None, name_free: bool | None = None, max_examples: int | None = None,
             num_threads: int = 8, progress: bool = False) -> dict:
    """Zero-shot metrics of ``model`` (an InferenceModel) on one dataset, each process reading and
    embedding its share of the examples (``per_process``).

    ``name_free``: also report every metric with the class names replaced by "object" (None: see
    ``uses_name_free``); costs one more text encoding of the class prompts, no image pass.

    Returns:
      ``{"top1", "top5", "mean_per_class_recall", "alpha<a>/top1", ..., ["name_free/top1", ...,
      "name_free/alpha<a>/top1", ...,] "count", "num_classes", "seconds", "images_per_second", "skipped",
      "skipped_examples"}``; count (every metric's denominator) excludes padding, examples outside the
      evaluated classes and the ``skipped`` unreadable images, listed as ``[{"path", "reason"}]``.
    """
    start = time.perf_counter()
    classifier = model.classifier(data.class_names, data.descriptors, templates, dataset=data.name,
                                  renormalize=renormalize)
    num_classes = len(data.class_names)
    # Score columns: [0, C) the classes as named, [C, 2C) name-free (one image pass scores both).
    columns = {"": slice(0, num_classes)}
    if uses_name_free(data, name_free):
        classifier = classifier_lib.concatenate(classifier, model.classifier(
            data.class_names, data.descriptors, templates, dataset=data.name, renormalize=renormalize,
            name_free=True))
        columns[NAME_FREE] = slice(num_classes, 2 * num_classes)
    alphas = usable_alphas(model, data, alphas)
    counts = {(prefix, a): _Counts(num_classes) for prefix in columns for a in alphas}
    class_counts = np.zeros(num_classes, np.int64)
    split = per_process.Split(model)
    everything = subset(len(data), max_examples)
    indices = split.share(everything)
    bar = tqdm(total=int((indices != per_process.PADDING).sum()), desc=data.name, unit="img", disable=not progress)
    image_start = time.perf_counter()
    skipped: list[dict] = []
    size = split.local_batch_size
    for i, (images, labels) in enumerate(batches(data, model, indices, size, num_threads=num_threads,
                                                 skipped=skipped)):
        global_scores, region_scores = model.score_parts(split.to_global(images), classifier)
        keep = labels >= 0
        labels = labels[keep]
        np.add.at(class_counts, labels, 1)
        for alpha in alphas:
            mixed = global_scores if alpha == 1.0 else alpha * global_scores + (1 - alpha) * region_scores
            mixed = split.local(mixed)[keep]
            for prefix, part in columns.items():
                counts[prefix, alpha].update(mixed[:, part], labels)
        bar.update(int((indices[i * size:(i + 1) * size] != per_process.PADDING).sum()))
    bar.close()
    class_counts = split.sum(class_counts)
    for c in counts.values():
        c.add_up(split)
    count = int(class_counts.sum())
    skipped = sorted(split.gather_objects(skipped), key=lambda s: s["path"])  # threads append in any order
    common.report_skipped(data.name, skipped, count)
    if count == 0:
        raise ValueError(f"{data.name}: no examples to evaluate ({len(skipped)} unreadable images skipped)")
    results: dict = {}
    for (prefix, alpha), c in counts.items():
        results.update({prefix + alpha_key(alpha) + k: v for k, v in c.metrics(count, class_counts).items()})
    end = time.perf_counter()
    results.update(count=count, num_classes=num_classes, seconds=end - start,
                   images_per_second=len(everything) / max(end - image_start, 1e-9), skipped=len(skipped),
                   skipped_examples=skipped)
    return results


def averages(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``average/<metric>`` over every dataset and ``average_11/<metric>`` over the
    reference's 11 non-ImageNet datasets that were evaluated (its "Average Accuracy",
    which it always divides by 11), for the metrics that all of them report."""
    out = {}
    groups = {"average": list(results), "average_11": [n for n in results if n in datasets_lib.ELEVEN]}
    for group, names in groups.items():
        if len(names) < 2 and group == "average" or not names:
            continue
        for metric in results[names[0]]:  # those every dataset has (alphas and name_free/ may differ)
            if metric.split("/")[-1] in METRICS and all(metric in results[n] for n in names):
                out[f"{group}/{metric}"] = float(np.mean([results[n][metric] for n in names]))
    return out


class Evaluator:
    """In-training zero-shot evaluator (``type="zeroshot"`` in ``config.evals``).

    Args:
      datasets: specs (``"synthetic:novel"``, ``"cifar10"``, ``"folder:PATH"``; see
        ``evaluators.datasets``) as a list or comma string.
      data_dir: TFDS data dir; descriptors: a descriptor file or directory;
      synthetic_dir: the synthetic benchmark's directory; synthetic: its ``ensure_synthetic`` sizes, for
        generating it there if absent (None: the generator's defaults).
      templates: template set name or list; renormalize: re-normalise class means.
      alphas: score mixes to report (1.0 = global only; None: see ``usable_alphas``).
      name_free: also report ``name_free/`` metrics (None: the synthetic benchmark only; see ``uses_name_free``).
      max_examples: evaluate a fixed random subset of each dataset.
    """

    def __init__(self, datasets, *, data_dir: str | None = None, descriptors: str | None = None,
                 synthetic_dir: str | None = None, synthetic: Mapping[str, Any] | None = None, templates="ref46",
                 renormalize: bool = False, alphas: Sequence[float] | None = None, name_free: bool | None = None,
                 max_examples: int | None = None, num_threads: int = 8):
        self.specs = datasets_lib.expand(datasets)
        # "" (a config's "not given", overridable from the command line) means None.
        self.data_dir, self.descriptors = data_dir or None, descriptors or None
        self.synthetic_dir, self.synthetic = synthetic_dir, synthetic
        self.kwargs = dict(templates=templates, renormalize=renormalize, alphas=alphas, name_free=name_free,
                           max_examples=max_examples, num_threads=num_threads)
        self._data: dict[str, datasets_lib.ClassificationData] = {}
        self._not_prepared: set[str] = set()
        self._names: dict[str, str] = {}  # reported name -> spec

    def _dataset(self, spec: str) -> datasets_lib.ClassificationData:
        if spec not in self._data:  # built lazily, once (scans folders / opens TFDS files)
            self._data[spec] = datasets_lib.classification_dataset(
                spec, data_dir=self.data_dir, descriptors=self.descriptors, synthetic_dir=self.synthetic_dir,
                synthetic=self.synthetic)
            datasets_lib.give_unique_name(self._data[spec], spec, self._names)
        return self._data[spec]

    def run(self, model) -> Iterator[tuple[str, float]]:
        results = {}
        for spec in self.specs:
            if spec in self._not_prepared:
                continue
            try:
                data = self._dataset(spec)
            except datasets_lib.NotPrepared as e:  # as in grain-jax-eval: one line, the others still run
                logging.warning("zero-shot evaluator skips %s: %s", spec, e)
                self._not_prepared.add(spec)
                continue
            metrics = evaluate(model, data, **self.kwargs)
            results[data.name] = metrics
            for key, value in metrics.items():
                if key.split("/")[-1] in METRICS:
                    yield f"0shot/{data.name}/{key}", value
        for key, value in averages(results).items():
            yield f"0shot/{key}", value
