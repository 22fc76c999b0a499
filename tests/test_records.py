"""The prepared-record schema and the ArrayRecord/TFDS writing helpers (no tokenizer involved)."""
import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from grain_jax.data import records

RESOLUTION, MAX_BOXES, LENGTH = 16, 3, 8


def _record(i: int) -> dict:
    jpeg = io.BytesIO()
    Image.new("RGB", (RESOLUTION, RESOLUTION), (10 * i, 0, 0)).save(jpeg, "JPEG", quality=95)
    return {
        "id": f"img/{i}.jpg",
        "image": jpeg.getvalue(),
        "caption_tokens": np.arange(LENGTH, dtype=np.int32) + i,
        "mllm_caption_tokens": np.zeros(LENGTH, np.int32),
        "has_mllm_caption": np.bool_(i % 2),
        "description_tokens": np.full((MAX_BOXES, LENGTH), i, np.int32),
        "boxes": np.full((MAX_BOXES, 4), 0.1 * i, np.float32),
        "box_mask": np.arange(MAX_BOXES) < i % (MAX_BOXES + 1),
        "box_scores": np.linspace(1, 0, MAX_BOXES, dtype=np.float32),
    }


def test_features_match_the_interface_schema():
    info = records.features(224).get_tensor_info()
    expected = {
        "id": ((), np.object_), "image": ((224, 224, 3), np.uint8),
        "caption_tokens": ((77,), np.int32), "mllm_caption_tokens": ((77,), np.int32),
        "has_mllm_caption": ((), np.bool_), "description_tokens": ((5, 77), np.int32),
        "boxes": ((5, 4), np.float32), "box_mask": ((5,), np.bool_), "box_scores": ((5,), np.float32),
    }
    assert {k: (tuple(v.shape), np.dtype(v.np_dtype)) for k, v in info.items()} == {
        k: (s, np.dtype(d)) for k, (s, d) in expected.items()}


def _write_dataset(directory, shards: dict[str, list[list[dict]]]):
    """Writes shards of records with the records helpers, as prepare does."""
    features = records.features(RESOLUTION, MAX_BOXES, LENGTH)
    serialize = records.RecordSerializer(features)
    work = directory / "work"
    work.mkdir(exist_ok=True)
    lengths, sizes = {}, {}
    for split, split_shards in shards.items():
        paths = []
        for k, shard in enumerate(split_shards):
            path = work / f"{split}-{k}"
            sizes[split] = sizes.get(split, 0) + records.write_shard(
                path, [serialize(r) for r in shard])
            paths.append(os.fspath(path))
        published = records.publish_split(directory, split, [p for p, s in zip(paths, split_shards) if s])
        assert [os.path.basename(p) for p in published] == [
            f"grain_jax-{split}.array_record-{k:05d}-of-{len(published):05d}" for k in range(len(published))]
        lengths[split] = [len(s) for s in split_shards if s]
    records.write_tfds_metadata(directory, features, lengths, sizes, description="test")


def test_written_shards_read_back_through_tfds(tmp_path):
    train = [_record(i) for i in range(5)]
    _write_dataset(tmp_path, {"train": [train[:3], train[3:]], "validation": [[_record(7)]]})
    builder = tfds.builder_from_directory(os.fspath(tmp_path))
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {"train": 5, "validation": 1}
    source = builder.as_data_source("train")
    assert len(source) == 5
    for i, want in enumerate(train):  # shard order is preserved: record i is train[i]
        got = source[i]
        assert got["id"] == want["id"].encode()
        assert got["image"].shape == (RESOLUTION, RESOLUTION, 3) and got["image"].dtype == np.uint8
        assert abs(int(got["image"][..., 0].mean()) - 10 * i) <= 2
        for key in ("caption_tokens", "description_tokens", "boxes", "box_mask", "box_scores", "has_mllm_caption"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert builder.as_data_source("validation")[0]["id"] == b"img/7.jpg"


def test_record_serializer_matches_tfds_serialization():
    features = records.features(RESOLUTION, MAX_BOXES, LENGTH)
    record = _record(2)
    ours = features.deserialize_example_np(records.RecordSerializer(features)(record))
    theirs = features.deserialize_example_np(features.serialize_example(record))
    assert ours.keys() == theirs.keys() == record.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_republishing_replaces_shards_and_empty_splits_are_left_out(tmp_path):
    _write_dataset(tmp_path, {"train": [[_record(1)], [_record(2)], [_record(3)]]})
    # Second write: fewer shards, one of them empty, and an empty validation split.
    _write_dataset(tmp_path, {"train": [[_record(4)], []], "validation": [[]]})
    names = sorted(n for n in os.listdir(tmp_path) if ".array_record-" in n)
    assert names == ["grain_jax-train.array_record-00000-of-00001"]
    builder = tfds.builder_from_directory(os.fspath(tmp_path))
    assert list(builder.info.splits) == ["train"]
    assert builder.as_data_source("train")[0]["id"] == b"img/4.jpg"


def test_no_valid_record_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no valid record"):
        _write_dataset(tmp_path, {"train": [[]]})


def test_publishing_refuses_sources_that_are_published_names(tmp_path):
    _write_dataset(tmp_path, {"train": [[_record(1)]]})
    published = str(tmp_path / "grain_jax-train.array_record-00000-of-00001")
    with pytest.raises(ValueError, match="already a published shard"):
        records.publish_split(tmp_path, "train", [published])
    assert os.path.exists(published)


def test_write_shard_is_atomic_and_reports_size(tmp_path):
    path = tmp_path / "shard.array_record"
    size = records.write_shard(path, [b"a", b"bc"])
    assert size == path.stat().st_size > 0
    assert os.listdir(tmp_path) == ["shard.array_record"]  # no temp file left behind


def test_read_info_names_a_directory_that_was_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="grain-jax-prepare"):
        records.read_info(tmp_path)
    records.write_json(tmp_path / records.INFO_FILE, {"resolution": 64, "splits": {"train": 1}})
    assert records.read_info(tmp_path) == {"resolution": 64, "splits": {"train": 1}}
