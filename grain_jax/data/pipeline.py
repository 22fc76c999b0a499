"""Grain input pipeline: prepared records (``records.py``) -> batches of the contract in ``batch.py``.

Training (``make_train_iterator``), per process::

    tfds source of this process's slice of the split (``tfds.split_for_jax_process``)
      -> shuffle (a new permutation every epoch) -> JPEG decode (+ resize if the records are
      not at ``image_size``) + caption choice (+ optional flip) -> repeat forever
      -> batch (global_batch_size / process_count) -> grain worker processes (``num_workers``)

Images stay uint8 up to the device; the jitted step normalises them (``transforms.normalize``
with ``mean``/``std``), exactly like evaluation and serving do.

Everything random is a pure function of ``seed``, the process index and the position in the
stream (the epoch picks the permutation, the stream index seeds the ``RandomMap`` rng), so the same seed gives
the same batches, whatever ``num_workers`` is, and the iterator state
(``get_state``/``set_state``, or ``grain.checkpoint.CheckpointSave/Restore`` in an orbax
Composite) is ``{"next_index": k}``: it resumes with the very next batch under any worker
count (``loader.BatchIterator``).

Evaluation (``make_eval_iterator``) reads one pass in order and pads the last batch with
all-zero examples flagged by ``mask`` [B] bool (False = padding), so nothing is dropped or
counted twice. Every process yields the same number of batches (``to_global`` needs that).

``data_config`` keys (dict or ``ml_collections.ConfigDict``; defaults in ``DEFAULTS``):
dir, train_split, eval_split, image_size (None = the records' resolution), caption_length,
description_length, max_boxes, mllm_caption_prob, mean, std (used on device, not here),
num_workers (-1 = sized from this process's CPU cores, see ``loader.resolve_num_workers``), prefetch, augment.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding

from grain_jax import sharding as sharding_lib
from grain_jax.data import loader, tokenizer, transforms

DEFAULTS: Mapping[str, Any] = {
    "train_split": "train",
    "eval_split": "validation",
    "image_size": None,
    "caption_length": 77,
    "description_length": 77,
    "max_boxes": 5,
    "mllm_caption_prob": 0.5,
    "mean": transforms.IMAGENET_MEAN,
    "std": transforms.IMAGENET_STD,
    "num_workers": 0,
    "prefetch": 2,
    "augment": False,
}

# The record features the pipeline reads: name -> (dtype, shape with symbolic dims).
# R = resolution, M = max boxes, L = context length (see records.py).
_RECORD_SCHEMA = {
    "image": (np.uint8, ("R", "R", 3)),
    "caption_tokens": (np.int32, ("L",)),
    "mllm_caption_tokens": (np.int32, ("L",)),
    "has_mllm_caption": (np.bool_, ()),
    "description_tokens": (np.int32, ("M", "L")),
    "boxes": (np.float32, ("M", 4)),
    "box_mask": (np.bool_, ("M",)),
}


def _option(data_config: Any, key: str) -> Any:
    value = data_config.get(key)
    return DEFAULTS.get(key) if value is None else value


@dataclasses.dataclass(frozen=True)
class _RecordShape:
    resolution: int
    max_boxes: int
    context_length: int


def _check_schema(directory: str, features: tfds.features.FeaturesDict) -> _RecordShape:
    """Reads R, M, L off the dataset's features; raises naming the first key that disagrees."""
    dims: dict[str, int] = {}
    for key, (dtype, shape) in _RECORD_SCHEMA.items():
        if key not in features:
            raise ValueError(f"{directory}: record schema mismatch: feature {key!r} is missing "
                             f"(has {sorted(features.keys())}); prepare the data with grain-jax-prepare")
        got_shape, got_dtype = tuple(features[key].shape), np.dtype(features[key].np_dtype)
        consistent = len(got_shape) == len(shape) and got_dtype == np.dtype(dtype)
        for want, got in zip(shape, got_shape):
            # A symbolic dim takes its value from its first occurrence and must match after.
            expected = dims.setdefault(want, got) if isinstance(want, str) else want
            consistent = consistent and got == expected
        if not consistent:
            raise ValueError(f"{directory}: record schema mismatch: feature {key!r} is "
                             f"{got_dtype.name}{list(got_shape)}, expected {np.dtype(dtype).name}{list(shape)} "
                             f"(R=resolution, M=max boxes, L=context length; so far {dims})")
    return _RecordShape(resolution=dims["R"], max_boxes=dims["M"], context_length=dims["L"])


@dataclasses.dataclass(frozen=True)
class _ExampleOptions:
    """How one record becomes one example of the batch contract (picklable for grain workers)."""
    image_size: int
    caption_length: int
    description_length: int
    max_boxes: int
    mllm_caption_prob: float
    augment: bool

    def empty(self) -> dict[str, np.ndarray]:
        """An all-zero example (eval padding)."""
        m, s = self.max_boxes, self.image_size
        return {
            "images": np.zeros((s, s, 3), np.uint8),
            "caption_tokens": np.zeros((self.caption_length,), np.int32),
            "description_tokens": np.zeros((m, self.description_length), np.int32),
            "boxes": np.zeros((m, 4), np.float32),
            "box_mask": np.zeros((m,), bool),
        }

    def example(self, record: Mapping[str, Any], use_mllm_caption: bool, flip: bool) -> dict[str, np.ndarray]:
        """One record -> ``images [S,S,3] uint8``, ``caption_tokens [Lc]``, ``description_tokens [M,Ld]``,
        ``boxes [M,4]`` cxcywh in [0,1], ``box_mask [M]`` (padded slots zero)."""
        # Squash like the prepare step did (boxes are normalised, so they stay valid); a no-op
        # for records stored at the training resolution, the common path.
        images = transforms.squash_resize(transforms.decode_image(record["image"], record["id"]), self.image_size)

        m = self.max_boxes  # records keep boxes sorted by score, so the first m are the top m
        box_mask = np.asarray(record["box_mask"][:m], bool)
        boxes = np.asarray(record["boxes"][:m], np.float32) * box_mask[:, None]
        descriptions = _fit_tokens(record["description_tokens"][:m], self.description_length) * box_mask[:, None]
        if flip:
            images = images[:, ::-1]
            boxes[:, 0] = np.where(box_mask, 1.0 - boxes[:, 0], 0.0)
        caption_key = "mllm_caption_tokens" if use_mllm_caption and record["has_mllm_caption"] else "caption_tokens"
        return {
            "images": np.ascontiguousarray(images),
            "caption_tokens": _fit_tokens(record[caption_key], self.caption_length),
            "description_tokens": descriptions.astype(np.int32),
            "boxes": boxes,
            "box_mask": box_mask,
        }


def _fit_tokens(tokens: np.ndarray, length: int) -> np.ndarray:
    """Token rows [..., L] -> [..., length] with EOT kept last (the stored rows when length == L)."""
    tokens = np.asarray(tokens, np.int32)
    return tokens if tokens.shape[-1] == length else tokenizer.truncate(tokens, length)


@functools.lru_cache(maxsize=2)  # the epoch being read and, around its end, the next one
def _epoch_order(seed: int, epoch: int, length: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(length).astype(np.uint32 if length < 2**32 else np.int64)


class _EpochShuffle(grain.MapDataset):
    """``parent`` in a fresh random order every epoch (epoch = index // len), like ``MapDataset.shuffle``.

    Reads one numpy permutation per epoch instead of grain's per-index Feistel shuffle, which costs
    about 0.6 ms of CPU per record here: more than decoding and normalising a 64 px image.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        length = len(self._parent)
        epoch, position = divmod(index, length)
        return self._parent[int(_epoch_order(self._seed, epoch, length)[position]) + epoch * length]


class _TrainExample(grain.transforms.RandomMap):
    """Record -> example; the caption (original vs MLLM) and the flip are drawn from grain's per-index rng."""

    def __init__(self, options: _ExampleOptions):
        self.options = options

    def random_map(self, record, rng: np.random.Generator):
        use_mllm = rng.random() < self.options.mllm_caption_prob
        flip = self.options.augment and rng.random() < 0.5
        return self.options.example(record, use_mllm_caption=use_mllm, flip=flip)


class _EvalExample(grain.transforms.Map):
    """Index -> example with ``mask``; indices past the source are zero padding (original captions, no flip)."""

    def __init__(self, source, options: _ExampleOptions):
        self.source, self.options = source, options

    def map(self, index):
        index = int(index)
        if index >= len(self.source):
            return {**self.options.empty(), "mask": np.bool_(False)}
        example = self.options.example(self.source[index], use_mllm_caption=False, flip=False)
        return {**example, "mask": np.bool_(True)}


def _builder(data_config: Any) -> tfds.core.DatasetBuilder:
    directory = _option(data_config, "dir")
    if not directory or not os.path.isdir(directory):
        raise FileNotFoundError(f"data_config.dir={directory!r} is not a directory; prepare one with grain-jax-prepare")
    try:
        return tfds.builder_from_directory(directory)
    except Exception as e:  # tfds raises several types for a non-dataset folder
        raise FileNotFoundError(f"{directory} is not a prepared TFDS dataset folder ({e}); "
                                f"prepare it with grain-jax-prepare") from e


def _process_source(builder, split: str, process_index: int | None, process_count: int | None,
                    drop_remainder: bool):
    """This process's contiguous slice of ``split`` as a random-access tfds source.

    Returns ``(source, process_index, process_count)``, the last two resolved from JAX when None.
    """
    if split not in builder.info.splits:
        raise ValueError(f"{builder.data_dir}: split {split!r} not found; available: {sorted(builder.info.splits)}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    subsplit = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count,
                                          drop_remainder=drop_remainder)
    # JPEG bytes are decoded by ``transforms.decode_image``: tfds's own numpy decoding of the
    # image feature costs about twice as much CPU per record (benchmarks/pipeline_throughput.py).
    source = builder.as_data_source(subsplit, decoders={"image": tfds.decode.SkipDecoding()})
    return source, process_index, process_count


def _example_options(data_config: Any, record: _RecordShape) -> _ExampleOptions:
    transforms.check_mean_std(_option(data_config, "mean"), _option(data_config, "std"))  # fail before training
    lengths = {k: int(_option(data_config, k)) for k in ("caption_length", "description_length")}
    for key, length in lengths.items():
        if not 2 <= length <= record.context_length:
            raise ValueError(f"data_config.{key}={length} must be in [2, {record.context_length}] "
                             f"(the records' context length)")
    max_boxes = int(_option(data_config, "max_boxes"))
    if not 1 <= max_boxes <= record.max_boxes:
        raise ValueError(f"data_config.max_boxes={max_boxes} must be in [1, {record.max_boxes}] "
                         f"(the records' max boxes)")
    prob = float(_option(data_config, "mllm_caption_prob"))
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"data_config.mllm_caption_prob must be in [0, 1], got {prob}")
    return _ExampleOptions(
        image_size=int(_option(data_config, "image_size") or record.resolution),
        max_boxes=max_boxes, mllm_caption_prob=prob,
        augment=bool(_option(data_config, "augment")), **lengths)


def _per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    return global_batch_size // process_count


def _to_iterator(dataset: grain.MapDataset, data_config: Any) -> loader.BatchIterator:
    """Batches in ``num_workers`` worker processes (or in-process threads), state independent of them."""
    return loader.BatchIterator(dataset, num_workers=int(_option(data_config, "num_workers")),
                                prefetch=int(_option(data_config, "prefetch")))


def num_records(data_config: Any, split: str | None = None) -> int:
    """Records in ``split`` (default ``train_split``) over all processes (the trainer's epoch size)."""
    builder = _builder(data_config)
    split = split or _option(data_config, "train_split")
    if split not in builder.info.splits:
        raise ValueError(f"{builder.data_dir}: split {split!r} not found; available: {sorted(builder.info.splits)}")
    return builder.info.splits[split].num_examples


def make_train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None) -> loader.BatchIterator:
    """Infinite, shuffled, checkpointable iterator of this process's numpy batches.

    Each batch holds ``global_batch_size / process_count`` examples of the contract in
    ``grain_jax/batch.py``. The split is cut into equal contiguous per-process slices (the
    remainder is dropped); process index/count default to JAX's and may be given for tests.
    An epoch is ``num_records(data_config) // global_batch_size`` steps.
    """
    builder = _builder(data_config)
    options = _example_options(data_config, _check_schema(builder.data_dir, builder.info.features))
    source, process_index, process_count = _process_source(
        builder, _option(data_config, "train_split"), process_index, process_count, drop_remainder=True)
    batch_size = _per_process_batch_size(global_batch_size, process_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    # Each process its own stream: with one seed for all, record k of every process's slice would
    # always land in the same global batch.
    process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    if len(source) < batch_size:
        raise ValueError(f"{builder.data_dir}: this process's share of the train split has {len(source)} records, "
                         f"fewer than one batch of {batch_size}")
    dataset = (_EpochShuffle(grain.MapDataset.source(source), process_seed).seed(process_seed)
               .random_map(_TrainExample(options))
               .repeat()  # indices run on past the epoch: a new permutation and new caption draws
               .batch(batch_size, drop_remainder=True))
    return _to_iterator(dataset, data_config)


def make_eval_iterator(data_config: Any, split: str | None = None, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None) -> loader.BatchIterator:
    """One ordered pass over ``split`` (default ``eval_split``), padded, with ``mask [B] bool``.

    The split is cut into near-equal contiguous per-process slices (nothing dropped); each
    process pads its slice with zero examples (``mask`` False) to the same number of batches,
    so ``sum(mask)`` over all batches and processes is the split size.
    """
    builder = _builder(data_config)
    options = _example_options(data_config, _check_schema(builder.data_dir, builder.info.features))
    split = split or _option(data_config, "eval_split")
    source, _, process_count = _process_source(builder, split, process_index, process_count, drop_remainder=False)
    batch_size = _per_process_batch_size(global_batch_size, process_count)
    largest_slice = math.ceil(builder.info.splits[split].num_examples / process_count)
    padded_length = math.ceil(largest_slice / batch_size) * batch_size
    dataset = grain.MapDataset.range(padded_length).map(_EvalExample(source, options)).batch(batch_size)
    return _to_iterator(dataset, data_config)


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding | Mesh) -> dict[str, jax.Array]:
    """This process's numpy batch -> global ``jax.Array``s sharded over the batch dimension.

    Args:
      batch: per-process arrays, leading dim = global batch / process count.
      sharding: ``sharding.batch_sharding(mesh, rules)``, or a mesh (its batch sharding under the
        default rules).
    """
    if isinstance(sharding, Mesh):
        sharding = sharding_lib.batch_sharding(sharding)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}
