"""Image-text retrieval evaluator: Recall@1/5/10 both ways, several captions per image.

Dataset specs:

* ``coco_captions``: TFDS (Karpathy splits; ``split="test"`` = 5k images x ~5 captions),
  built with ``tfds build coco_captions --file_format=array_record``.
* ``captions:FILE``: a caption file plus an image folder (``image_dir``, default: the
  file's folder), e.g. Flickr30k. FILE is one of
  - Karpathy JSON ``{"images": [{"filename", "split", "sentences": [{"raw"}, ...]}]}``,
  - a JSON list ``[{"image": "rel/path.jpg", "captions": ["...", ...]}, ...]``,
  - a CSV with columns ``filename`` and ``captions`` (or ``raw``, as the reference's
    flickr CSV) holding a JSON list of captions, optionally ``split``.
  Caption lists are parsed as JSON, never split on commas.

Image->text: an image scores a hit at K if any of its captions is among its K best
captions; text->image: a caption scores a hit if its image is among its K best images.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Iterator, Sequence

import grain
import numpy as np
from tqdm import tqdm

from grain_jax.data import images as images_lib
from grain_jax.evaluators import common, per_process
from grain_jax.inference import preprocess_image

KS = (1, 5, 10)


@dataclasses.dataclass
class RetrievalData:
    """``source[i] -> (uint8 image [H, W, 3], [caption, ...])``."""
    name: str
    source: Sequence

    def __len__(self) -> int:
        return len(self.source)


class _CaptionFileSource:
    def __init__(self, items: list[tuple[str, list[str]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, captions = self.items[index]
        return images_lib.read_rgb(path), captions

    def describe(self, index: int) -> str:
        return self.items[index][0]


class _CocoSource:
    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        example = self.source[index]
        texts = example["captions"]["text"]
        return np.asarray(example["image"]), [t.decode() if isinstance(t, bytes) else str(t) for t in texts]


def _caption_list(cell: str, where: str) -> list[str]:
    """A JSON list of captions (or one plain caption) from a CSV cell."""
    cell = cell.strip()
    if cell.startswith("["):
        try:
            captions = json.loads(cell)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: caption list is not valid JSON ({e}): {cell[:80]!r}") from e
    else:
        captions = [cell]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"{where}: expected a non-empty list of captions, got {cell[:80]!r}")
    return [c.strip() for c in captions]


def read_caption_file(path: str, image_dir: str | None = None,
                      split: str | None = "test") -> list[tuple[str, list[str]]]:
    """[(image path, captions)] from a caption file (formats in the module docstring);
    rows with a ``split`` field other than ``split`` are dropped (``split=None`` keeps all)."""
    image_dir = image_dir or os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str, list[str], str | None]] = []
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                column = "captions" if "captions" in row else "raw"
                if "filename" not in row or column not in row:
                    raise ValueError(f"{path}: CSV needs columns 'filename' and 'captions' (or 'raw'); has {list(row)}")
                rows.append((row["filename"], _caption_list(row[column], f"{path} row {i + 2}"), row.get("split")))
    else:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "images" in data:  # Karpathy layout
            for entry in data["images"]:
                rows.append((entry["filename"], [s["raw"] for s in entry["sentences"]], entry.get("split")))
        elif isinstance(data, list):
            for i, entry in enumerate(data):
                if not isinstance(entry, dict) or "image" not in entry or "captions" not in entry:
                    raise ValueError(f"{path}: entry {i} must be {{'image': ..., 'captions': [...]}}, "
                                     f"got {entry!r:.80}")
                if not isinstance(entry["captions"], list) or not entry["captions"]:
                    raise ValueError(f"{path}: entry {i} ({entry['image']}): captions must be a non-empty list")
                rows.append((entry["image"], list(entry["captions"]), entry.get("split")))
        else:
            raise ValueError(f"{path}: expected a Karpathy JSON or a list of {{image, captions}}")
    items = [(os.path.join(image_dir, name), caps) for name, caps, row_split in rows
             if split is None or row_split is None or row_split == split]
    if not items:
        raise ValueError(f"{path}: no images (split={split!r})")
    missing = [p for p, _ in items if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} images not found under {image_dir}, e.g. {missing[0]}")
    return items


def retrieval_dataset(spec: str, *, data_dir: str | None = None, image_dir: str | None = None,
                      split: str = "test") -> RetrievalData:
    if spec.startswith("captions:"):
        path = spec.split(":", 1)[1]
        name = os.path.splitext(os.path.basename(path))[0]
        return RetrievalData(name, _CaptionFileSource(read_caption_file(path, image_dir, split)))
    if spec == "coco_captions":
        from grain_jax.evaluators.datasets import open_tfds
        source, _ = open_tfds(spec, split, data_dir)
        return RetrievalData(spec, _CocoSource(source))
    raise ValueError(f"unknown retrieval dataset {spec!r}; use coco_captions or captions:FILE")


def recall_at_k(similarity: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = KS,
                chunk: int = 1024) -> dict[str, float]:
    """Recall@K both ways.

    Args:
      similarity: [I, T] image x caption scores.
      caption_image: [T] the image index of each caption.
    """
    num_images, num_texts = similarity.shape
    img_rank = np.empty(num_images, np.int64)
    for start in range(0, num_images, chunk):
        s = similarity[start:start + chunk]
        own = caption_image[None, :] == np.arange(start, start + s.shape[0])[:, None]
        best_own = np.where(own, s, -np.inf).max(1)
        img_rank[start:start + s.shape[0]] = (s > best_own[:, None]).sum(1)
    txt_rank = np.empty(num_texts, np.int64)
    for start in range(0, num_texts, chunk):
        s = similarity[:, start:start + chunk].T  # [t, I]
        own_score = s[np.arange(s.shape[0]), caption_image[start:start + s.shape[0]]]
        txt_rank[start:start + s.shape[0]] = (s > own_score[:, None]).sum(1)
    out = {f"img2txt_R@{k}": float(np.mean(img_rank < k)) for k in ks}
    out.update({f"txt2img_R@{k}": float(np.mean(txt_rank < k)) for k in ks})
    return out


def evaluate(model, data: RetrievalData, *, max_images: int | None = None, num_threads: int = 8,
             progress: bool = False) -> dict:
    """Recall@K of ``model`` (an InferenceModel) plus counts and timing; images that cannot be
    decoded are left out with their captions and listed in ``skipped_examples``. Each process
    reads and embeds its share of the images (``per_process``); the captions are embedded once
    all processes' are gathered."""

    start = time.perf_counter()
    skipped: list[dict] = []

    def load(index):
        if index == per_process.PADDING:
            return None
        example = common.read_example(data.source, index, data.name, skipped)
        return None if example is None else (preprocess_image(example[0], model.spec), example[1])

    split = per_process.Split(model)
    indices = split.share(np.arange(min(len(data.source), max_images or len(data.source))))
    ds = grain.MapDataset.source(indices).map(load)
    bar = tqdm(total=int((indices != per_process.PADDING).sum()), desc=data.name, unit="img",
               disable=not progress)
    image_embeddings, captions = [], []  # this process's images: [n, D], [[caption, ...]] * n
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    size = model.spec.image_size
    for batch in ds.batch(split.local_batch_size, batch_fn=list).to_iter_dataset(read):
        bar.update(sum(example is not None for example in batch))
        pixels = np.stack([np.zeros((size, size, 3), np.uint8) if example is None else example[0]
                           for example in batch])
        embeddings = split.local(model.encode_images(split.to_global(pixels)))
        real = [i for i, example in enumerate(batch) if example is not None]
        image_embeddings.append(embeddings[real])
        captions += [batch[i][1] for i in real]
    bar.close()
    if not image_embeddings:  # no examples at all (every process alike)
        raise ValueError(f"{data.name}: no images to evaluate")
    images = split.gather(np.concatenate(image_embeddings))  # every process's, in the examples' order
    captions = split.gather_objects(captions)
    skipped = sorted(split.gather_objects(skipped), key=lambda s: s["path"])
    common.report_skipped(data.name, skipped, len(images))
    if not len(images):
        raise ValueError(f"{data.name}: no images to evaluate ({len(skipped)} unreadable images skipped)")
    caption_image = np.concatenate([np.full(len(caps), i) for i, caps in enumerate(captions)])
    texts = model.encode_texts([caption for caps in captions for caption in caps])
    results = recall_at_k(images @ texts.T, caption_image)
    results.update(num_images=len(images), num_captions=len(texts), seconds=time.perf_counter() - start,
                   skipped=len(skipped), skipped_examples=skipped)
    return results


class Evaluator:
    """In-training retrieval evaluator (``type="retrieval"`` in ``config.evals``).

    Args:
      dataset: ``coco_captions`` or ``captions:FILE``; data_dir: TFDS data dir;
      image_dir: images of a caption file; split: rows to keep; max_images: first N images only.
    """

    def __init__(self, dataset: str, *, data_dir: str | None = None, image_dir: str | None = None,
                 split: str = "test", max_images: int | None = None, num_threads: int = 8):
        self.spec, self.data_dir, self.image_dir, self.split = dataset, data_dir, image_dir, split
        self.kwargs = dict(max_images=max_images, num_threads=num_threads)
        self._data: RetrievalData | None = None

    def run(self, model) -> Iterator[tuple[str, float]]:
        if self._data is None:
            self._data = retrieval_dataset(self.spec, data_dir=self.data_dir, image_dir=self.image_dir,
                                           split=self.split)
        for key, value in evaluate(model, self._data, **self.kwargs).items():
            if "R@" in key:
                yield f"retrieval/{self._data.name}/{key}", value
