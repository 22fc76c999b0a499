"""Grain input pipeline: prepared records (``records.py``) -> batches of the contract in ``batch.py``.

Training (``make_train_iterator``), per process: a grain ``MapDataset`` whose element k is batch k,
built by one ``Map`` (``_TrainBatches``) in grain's worker processes (``num_workers``)::

    stream indices k*B .. k*B+B-1 (B = global_batch_size / process_count)
      -> records of this process's slice of the split (``tfds.split_for_jax_process``), in a new
         permutation every epoch, read as serialized bytes and parsed by ``_RecordParser``
      -> caption choice (+ optional flip) drawn per stream index
      -> JPEG decode (+ resize if the records are not at ``image_size``) into the batch's uint8 array,
         token re-truncation, box masking and flipping on whole-batch arrays

Per record, besides the JPEG decode, this leaves reading and parsing the record and copying it into
the batch: no tfds feature decoding, no per-record grain stages, no per-example dicts to stack
(benchmarks/pipeline_throughput.py profiles each step).

Images stay uint8 up to the device; the jitted step normalises them (``transforms.normalize``
with ``mean``/``std``), exactly like evaluation and serving do.

Everything random is a pure function of ``seed``, the process index and the position in the
stream (the epoch picks the permutation, the stream index seeds the record's rng), so the same seed gives
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
num_workers (-1 = sized from this process's CPU cores, see ``loader.resolve_num_workers``), prefetch, augment;
text_length_buckets (not read here: the trainer and the validation evaluator cut each batch's texts to the
shortest bucket that holds them, ``models.text_batching.fit_texts``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from tensorflow_datasets.proto import tf_example_pb2

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

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """``_RECORD_SCHEMA``'s shapes with R, M, L filled in."""
        dims = {"R": self.resolution, "M": self.max_boxes, "L": self.context_length}
        return {key: tuple(dims.get(d, d) for d in shape) for key, (_, shape) in _RECORD_SCHEMA.items()}


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


class _RecordParser:
    """Serialized tf.Example of a prepared record -> ``id`` (bytes), ``image`` (encoded bytes) and
    the other ``_RECORD_SCHEMA`` features as numpy arrays of their schema dtype and shape.

    The values are tfds's (``as_data_source`` with the image left encoded, which
    tests/test_pipeline.py checks feature by feature), parsed with the protobuf message tfds's numpy
    parser uses, but only the features the pipeline reads and without tfds's generic walk over
    the feature tree: reading and parsing a record takes about a third of tfds's CPU time
    (benchmarks/pipeline_throughput.py).
    """

    def __init__(self, record: _RecordShape):
        self._arrays = [(key, np.dtype(dtype), shape, math.prod(shape), np.issubdtype(dtype, np.floating))
                        for (key, (dtype, _)), shape in zip(_RECORD_SCHEMA.items(), record.feature_shapes().values())
                        if key != "image"]

    def __call__(self, serialized: bytes) -> dict[str, Any]:
        features = tf_example_pb2.Example.FromString(serialized).features.feature
        record_id = features["id"].bytes_list.value[0] if "id" in features else b"?"
        record = {"id": record_id, "image": self._value(features, "image", record_id).bytes_list.value[0]}
        for key, dtype, shape, size, is_float in self._arrays:
            feature = self._value(features, key, record_id)
            values = np.array(feature.float_list.value if is_float else feature.int64_list.value, dtype)
            if values.size != size:
                raise ValueError(f"record {record_id!r}: feature {key!r} has {values.size} values, the dataset's "
                                 f"features.json says shape {list(shape)}")
            record[key] = values.reshape(shape)
        return record

    @staticmethod
    def _value(features, key: str, record_id: bytes):
        if key not in features:
            raise ValueError(f"record {record_id!r}: feature {key!r} is missing (has {sorted(features)})")
        return features[key]


@dataclasses.dataclass(frozen=True)
class _ExampleOptions:
    """How records become a batch of the contract (picklable for grain workers)."""
    image_size: int
    caption_length: int
    description_length: int
    max_boxes: int
    mllm_caption_prob: float
    augment: bool

    def batch(self, records: Sequence[Mapping[str, Any]], size: int, use_mllm_caption: Sequence[bool],
              flip: Sequence[bool]) -> dict[str, np.ndarray]:
        """``records`` (parsed, see ``_RecordParser``) -> ``images [size,S,S,3] uint8``,
        ``caption_tokens [size,Lc]``, ``description_tokens [size,M,Ld]``, ``boxes [size,M,4]`` cxcywh
        in [0,1], ``box_mask [size,M]``; padded box slots and rows past ``len(records)`` are zero.
        ``use_mllm_caption`` and ``flip`` [len(records)] are the per-record draws."""
        images = loader.batch_array((size, self.image_size, self.image_size, 3), np.uint8)
        try:
            return self._fill(images, records, use_mllm_caption, flip)
        except BaseException:
            loader.discard(images)
            raise

    def _fill(self, images: np.ndarray, records: Sequence[Mapping[str, Any]], use_mllm_caption: Sequence[bool],
              flip: Sequence[bool]) -> dict[str, np.ndarray]:
        """``batch`` with ``images`` [size,S,S,3] allocated (zero-filled): decodes into it."""
        size, m = len(images), self.max_boxes
        # Stored token rows [size, L] / [size, M, L]: re-truncated below, for the whole batch at once.
        captions = np.zeros((size, records[0]["caption_tokens"].shape[-1] if records else self.caption_length),
                            np.int32)
        descriptions = np.zeros((size, m, records[0]["description_tokens"].shape[-1] if records
                                 else self.description_length), np.int32)
        boxes = np.zeros((size, m, 4), np.float32)
        box_mask = np.zeros((size, m), bool)
        flips = np.zeros((size,), bool)
        for row, (record, use_mllm, flip_row) in enumerate(zip(records, use_mllm_caption, flip)):
            # Squash like the prepare step did (boxes are normalised, so they stay valid); a no-op
            # for records stored at the training resolution, the common path.
            image = transforms.squash_resize(transforms.decode_image(record["image"], record["id"]), self.image_size)
            images[row] = image[:, ::-1] if flip_row else image
            flips[row] = flip_row
            use_mllm = use_mllm and record["has_mllm_caption"]
            captions[row] = record["mllm_caption_tokens" if use_mllm else "caption_tokens"]
            # Records keep boxes sorted by score, so the first m are the top m.
            descriptions[row] = record["description_tokens"][:m]
            boxes[row] = record["boxes"][:m]
            box_mask[row] = record["box_mask"][:m]
        boxes *= box_mask[..., None]
        boxes[..., 0] = np.where(flips[:, None], np.where(box_mask, 1.0 - boxes[..., 0], 0.0), boxes[..., 0])
        return {
            "images": images,
            "caption_tokens": _fit_tokens(captions, self.caption_length),
            "description_tokens": _fit_tokens(descriptions, self.description_length) * box_mask[..., None],
            "boxes": boxes,
            "box_mask": box_mask,
        }

    def example(self, record: Mapping[str, Any], use_mllm_caption: bool, flip: bool) -> dict[str, np.ndarray]:
        """One record -> one example (``batch`` of one, leading dim dropped)."""
        return {key: value[0] for key, value in self.batch([record], 1, [use_mllm_caption], [flip]).items()}


def _fit_tokens(tokens: np.ndarray, length: int) -> np.ndarray:
    """Token rows [..., L] -> [..., length] with EOT kept last (the stored rows when length == L)."""
    tokens = np.asarray(tokens, np.int32)
    return tokens if tokens.shape[-1] == length else tokenizer.truncate(tokens, length)


@functools.lru_cache(maxsize=2)  # the epoch being read and, around its end, the next one
def _epoch_order(seed: int, epoch: int, length: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(length).astype(np.uint32 if length < 2**32 else np.int64)


def _draw_key(process_seed: int) -> np.ndarray:
    """Philox key of the per-record draws, the one grain's ``MapDataset.seed(process_seed).random_map``
    used in earlier versions of this pipeline: a seed (and a resumed checkpoint) keeps its batches."""
    op_seed = np.random.SeedSequence([process_seed, 1]).generate_state(1, dtype=np.uint32)[0]
    return np.random.Philox(op_seed).state["state"]["key"]


def _position_rng(key: np.ndarray, position: int) -> np.random.Generator:
    """The rng of stream position ``position`` (grain's ``RandomMap`` counter layout)."""
    return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, 0, position]))


class _TrainBatches(grain.transforms.Map):
    """Batch index k -> batch k: stream positions k*B .. k*B+B-1, each a record of the source in this
    epoch's permutation (epoch = position // len(source)), with its caption choice (original vs
    MLLM) and flip drawn from a Philox rng whose counter is the position."""

    def __init__(self, source, parse: _RecordParser, options: _ExampleOptions, batch_size: int, seed: int):
        self.source, self.parse, self.options = source, parse, options
        self.batch_size, self.seed, self.key = batch_size, seed, _draw_key(seed)

    def map(self, index):
        length = len(self.source)
        records, use_mllm, flip = [], [], []
        for position in range(int(index) * self.batch_size, (int(index) + 1) * self.batch_size):
            epoch, offset = divmod(position, length)
            records.append(self.parse(self.source[int(_epoch_order(self.seed, epoch, length)[offset])]))
            rng = _position_rng(self.key, position)
            use_mllm.append(rng.random() < self.options.mllm_caption_prob)
            flip.append(self.options.augment and rng.random() < 0.5)
        return self.options.batch(records, self.batch_size, use_mllm, flip)


class _EvalBatches(grain.transforms.Map):
    """Batch index k -> examples k*B .. k*B+B-1 of the source in order, with ``mask [B]``; positions
    past the source are zero padding (original captions, no flip)."""

    def __init__(self, source, parse: _RecordParser, options: _ExampleOptions, batch_size: int):
        self.source, self.parse, self.options, self.batch_size = source, parse, options, batch_size

    def map(self, index):
        start = int(index) * self.batch_size
        positions = range(start, min(start + self.batch_size, len(self.source)))
        records = [self.parse(self.source[position]) for position in positions]
        batch = self.options.batch(records, self.batch_size, [False] * len(records), [False] * len(records))
        return {**batch, "mask": np.arange(self.batch_size) < len(records)}


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
    """This process's contiguous slice of ``split``: random access to its serialized records.

    Returns ``(source, process_index, process_count)``, the last two resolved from JAX when None.
    ``_RecordParser`` parses the records (tfds's own deserialisation costs about 3x as much CPU).
    """
    if split not in builder.info.splits:
        raise ValueError(f"{builder.data_dir}: split {split!r} not found; available: {sorted(builder.info.splits)}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    subsplit = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count,
                                          drop_remainder=drop_remainder)
    source = builder.as_data_source(subsplit, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
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
    record = _check_schema(builder.data_dir, builder.info.features)
    options = _example_options(data_config, record)
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
    # Endless: positions run on past the epoch, with a new permutation and new caption draws.
    dataset = grain.MapDataset.range(sys.maxsize // batch_size).map(
        _TrainBatches(source, _RecordParser(record), options, batch_size, process_seed))
    return _to_iterator(dataset, data_config)


def make_eval_iterator(data_config: Any, split: str | None = None, *, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None) -> loader.BatchIterator:
    """One ordered pass over ``split`` (default ``eval_split``), padded, with ``mask [B] bool``.

    The split is cut into near-equal contiguous per-process slices (nothing dropped); each
    process pads its slice with zero examples (``mask`` False) to the same number of batches,
    so ``sum(mask)`` over all batches and processes is the split size.
    """
    builder = _builder(data_config)
    record = _check_schema(builder.data_dir, builder.info.features)
    options = _example_options(data_config, record)
    split = split or _option(data_config, "eval_split")
    source, _, process_count = _process_source(builder, split, process_index, process_count, drop_remainder=False)
    batch_size = _per_process_batch_size(global_batch_size, process_count)
    largest_slice = math.ceil(builder.info.splits[split].num_examples / process_count)
    dataset = grain.MapDataset.range(math.ceil(largest_slice / batch_size)).map(
        _EvalBatches(source, _RecordParser(record), options, batch_size))
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
