"""The prepared-record format: TFDS features, ArrayRecord shards and dataset metadata.

One record is one image with its texts and grounded regions (R = resolution,
M = max_boxes, L = context_length):

| feature               | dtype / shape        | meaning                                                   |
|-----------------------|----------------------|-----------------------------------------------------------|
| `id`                  | Text                 | source id (image path, webdataset key, synthetic id)      |
| `image`               | JPEG, uint8 [R,R,3]  | squash-resized (bicubic) RGB image                         |
| `caption_tokens`      | int32 [L]            | original caption, CLIP BPE, SOT ... EOT, zero padded       |
| `mllm_caption_tokens` | int32 [L]            | MLLM caption tokens, all zeros when there is none          |
| `has_mllm_caption`    | bool []              | whether `mllm_caption_tokens` holds a caption              |
| `description_tokens`  | int32 [M,L]          | description m belongs to box m, zero rows for padding      |
| `boxes`               | float32 [M,4]        | cxcywh in [0,1] of the squashed image, zeros for padding   |
| `box_mask`            | bool [M]             | True for valid box+description slots, packed first         |
| `box_scores`          | float32 [M]          | detector score of each kept region (descending), 0 padding |

A prepared directory is a TFDS dataset folder (`tfds.builder_from_directory(DIR)`,
splits `train` / `validation`, files `grain_jax-<split>.array_record-NNNNN-of-MMMMM`)
that also holds `prepare_report.jsonl` (one JSON object per skipped or repaired
record) and `grain_jax_info.json` (counts, resolution, tokenizer, the report summary).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer, file_adapters, naming

DATASET_NAME = "grain_jax"
SPLITS = ("train", "validation")
REPORT_FILE = "prepare_report.jsonl"
INFO_FILE = "grain_jax_info.json"
FILE_FORMAT = "array_record"
TOKENIZER_NAME = "openai-clip-bpe (bpe_simple_vocab_16e6, vocab 49408, SOT 49406, EOT 49407)"


def features(resolution: int, max_boxes: int = 5, context_length: int = 77) -> tfds.features.FeaturesDict:
    """The TFDS features of one prepared record (see the module docstring)."""
    tensor = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(doc="source id: image path, webdataset key or synthetic id"),
        # Fed with JPEG bytes encoded by PIL: encoding a numpy array would need TensorFlow.
        "image": tfds.features.Image(shape=(resolution, resolution, 3), encoding_format="jpeg",
                                     doc="squash-resized (bicubic) RGB image"),
        "caption_tokens": tensor(shape=(context_length,), dtype=np.int32, doc="original caption, CLIP BPE"),
        "mllm_caption_tokens": tensor(shape=(context_length,), dtype=np.int32,
                                      doc="MLLM caption, CLIP BPE; zeros if none"),
        "has_mllm_caption": tensor(shape=(), dtype=np.bool_, doc="whether mllm_caption_tokens is a caption"),
        "description_tokens": tensor(shape=(max_boxes, context_length), dtype=np.int32,
                                     doc="region descriptions, row m belongs to box m"),
        "boxes": tensor(shape=(max_boxes, 4), dtype=np.float32, doc="cxcywh in [0,1]"),
        "box_mask": tensor(shape=(max_boxes,), dtype=np.bool_, doc="valid box+description, packed first"),
        "box_scores": tensor(shape=(max_boxes,), dtype=np.float32, doc="detector scores, descending"),
    })


class RecordSerializer:
    """`features.serialize_example` with byte-identical output in every process.

    tf.Example keeps its features in a protobuf map, whose serialisation order may differ between
    processes; deterministic serialisation makes a shard's bytes independent of the worker.
    """

    def __init__(self, record_features: tfds.features.FeaturesDict):
        self.features = record_features
        self._serializer = example_serializer.ExampleSerializer(record_features.get_serialized_info())

    def __call__(self, record: Mapping[str, Any]) -> bytes:
        proto = self._serializer.get_tf_example(self.features.encode_example(record))
        return proto.SerializeToString(deterministic=True)


def filename_template(output_dir: str | os.PathLike, split: str) -> naming.ShardedFileTemplate:
    """TFDS's default file naming, `grain_jax-<split>.array_record-NNNNN-of-MMMMM`."""
    return naming.ShardedFileTemplate(data_dir=os.fspath(output_dir), dataset_name=DATASET_NAME,
                                      split=split, filetype_suffix=FILE_FORMAT)


def write_shard(path: str | os.PathLike, serialized_records: Iterable[bytes]) -> int:
    """Writes serialized records to one ArrayRecord file atomically; returns its size in bytes.

    The file appears under its final name only once complete (temp name + rename), so an
    interrupted run never leaves a truncated shard that a resumed run would trust.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    file_adapters.ArrayRecordFileAdapter.write_examples(tmp, ((None, r) for r in serialized_records))
    os.replace(tmp, path)
    return os.path.getsize(path)


def shard_path(output_dir: str | os.PathLike, split: str, index: int, num_shards: int) -> str:
    """Path of shard `index` of `num_shards` of `split` under TFDS's naming."""
    return os.fspath(filename_template(output_dir, split).sharded_filepath(shard_index=index, num_shards=num_shards))


def publish_split(output_dir: str | os.PathLike, split: str, shard_paths: Sequence[str]) -> list[str]:
    """Moves `shard_paths` (in order) to the TFDS names of `split`; returns the new paths.

    Files are renamed, never copied, so a prepared folder holds each record once. Every shard of
    `split` published before is removed first (its `-of-YYYYY` count may be stale), so the
    sources must not themselves be published names of `split`.
    """
    pattern = filename_template(output_dir, split).sharded_filepaths_pattern()
    old = glob.glob(pattern)
    if clash := {os.path.abspath(p) for p in old} & {os.path.abspath(p) for p in shard_paths}:
        raise ValueError(f"cannot publish {sorted(clash)}: already a published shard of {split!r}")
    for path in old:
        os.remove(path)
    published = [shard_path(output_dir, split, index, len(shard_paths)) for index in range(len(shard_paths))]
    for source, destination in zip(shard_paths, published):
        os.replace(source, destination)
    return published


def write_tfds_metadata(output_dir: str | os.PathLike, record_features: tfds.features.FeaturesDict,
                        shard_lengths: Mapping[str, Sequence[int]], num_bytes: Mapping[str, int],
                        description: str) -> None:
    """Writes `dataset_info.json` / `features.json` so `tfds.builder_from_directory` reads the shards.

    Only splits with at least one record are listed: TFDS cannot open an empty ArrayRecord split.
    """
    split_infos = [
        tfds.core.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=int(num_bytes[split]),
                            filename_template=filename_template(output_dir, split))
        for split, lengths in shard_lengths.items() if sum(lengths) > 0
    ]
    if not split_infos:
        raise ValueError(f"no valid record was prepared in {output_dir}; see {REPORT_FILE} there")
    # check_data=False: TFDS's check reads through tf.data, which needs TensorFlow.
    tfds.folder_dataset.write_metadata(
        data_dir=os.fspath(output_dir), features=record_features, split_infos=split_infos,
        filename_template=filename_template(output_dir, None), check_data=False, description=description)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically (temp name + rename); keys in insertion order."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def read_info(directory: str | os.PathLike) -> dict:
    """The `grain_jax_info.json` of a prepared directory."""
    path = os.path.join(directory, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a prepared grain_jax dataset: {INFO_FILE} is missing "
                                f"(create it with grain-jax-prepare)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_report(directory: str | os.PathLike) -> list[dict]:
    """The entries of `prepare_report.jsonl` in a prepared directory, in file order."""
    with open(os.path.join(directory, REPORT_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
