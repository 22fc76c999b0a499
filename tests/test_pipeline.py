"""Tests of the grain input pipeline over a tiny dataset written with the real record writer."""
import io
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from grain_jax import batch as batch_lib
from grain_jax.data import loader, pipeline, records
from grain_jax.data.tokenizer import EOT, SOT
from grain_jax.sharding import create_mesh

RESOLUTION, MAX_BOXES, CONTEXT = 16, 5, 77
NUM_TRAIN, NUM_VALIDATION = 24, 11
CAPTION_ID, MLLM_ID = 1000, 20000  # caption_tokens[1] = CAPTION_ID + record index (MLLM: MLLM_ID + index)


def _text(first_token, length):
    """SOT, ``first_token``, filler ..., EOT zero padded to CONTEXT: ``length`` tokens in all."""
    tokens = np.zeros(CONTEXT, np.int32)
    tokens[:length] = [SOT, first_token] + [500 + k for k in range(length - 3)] + [EOT]
    return tokens


def _record(index):
    """Record ``index``: texts identify it, every third has a long caption, odd ones lack an MLLM caption."""
    image = np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)
    image[:, : RESOLUTION // 2] = 255  # bright left half: a horizontal flip is visible
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, "JPEG", quality=95)
    num_boxes = index % (MAX_BOXES + 1)
    rng = np.random.default_rng(index)
    centre, size = rng.uniform(0.3, 0.7, (MAX_BOXES, 2)), rng.uniform(0.1, 0.5, (MAX_BOXES, 2))
    box_mask = np.arange(MAX_BOXES) < num_boxes
    descriptions = np.stack([_text(30000 + 10 * index + m, 4 + 7 * m) for m in range(MAX_BOXES)])
    has_mllm = index % 2 == 0
    return {
        "id": f"record-{index}",
        "image": jpeg.getvalue(),
        "caption_tokens": _text(CAPTION_ID + index, CONTEXT if index % 3 == 0 else 6),
        "mllm_caption_tokens": _text(MLLM_ID + index, 9) if has_mllm else np.zeros(CONTEXT, np.int32),
        "has_mllm_caption": has_mllm,
        "description_tokens": descriptions * box_mask[:, None],
        "boxes": (np.concatenate([centre, size], -1) * box_mask[:, None]).astype(np.float32),
        "box_mask": box_mask,
        "box_scores": np.linspace(0.9, 0.5, MAX_BOXES, dtype=np.float32) * box_mask,
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("records"))
    serialize = records.RecordSerializer(records.features(RESOLUTION, MAX_BOXES, CONTEXT))
    sizes, num_bytes = {}, {}
    for split, count, offset in (("train", NUM_TRAIN, 0), ("validation", NUM_VALIDATION, 1000)):
        shards = []
        for shard, indices in enumerate(np.array_split(np.arange(offset, offset + count), 2)):
            path = os.path.join(directory, f"{split}-{shard}.tmp_shard")
            num_bytes[split] = num_bytes.get(split, 0) + records.write_shard(
                path, [serialize(_record(int(i))) for i in indices])
            shards.append(path)
        records.publish_split(directory, split, shards)
        sizes[split] = [len(s) for s in np.array_split(np.arange(count), 2)]
    records.write_tfds_metadata(directory, serialize.features, sizes, num_bytes, "pipeline test records")
    return directory


def _config(data_dir, **overrides):
    return {"dir": data_dir, "image_size": RESOLUTION, "caption_length": 12, "description_length": 8,
            "num_workers": 0, "prefetch": 0, **overrides}


def _record_ids(batch):
    """Which record each example came from (off the caption token; 0 = padding)."""
    first = batch["caption_tokens"][:, 1]
    return np.where(first >= MLLM_ID, first - MLLM_ID, first - CAPTION_ID) * (first > 0)


def _stream_ids(batches):
    return np.concatenate([_record_ids(b) for b in batches])


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batch_contract(data_dir):
    config = _config(data_dir, mllm_caption_prob=0.0)
    batch = next(pipeline.make_train_iterator(config, global_batch_size=8, seed=0))
    batch_lib.validate(batch)
    assert batch["images"].shape == (8, RESOLUTION, RESOLUTION, 3) and batch["images"].dtype == np.uint8
    assert batch["caption_tokens"].shape == (8, 12) and batch["caption_tokens"].dtype == np.int32
    assert batch["description_tokens"].shape == (8, MAX_BOXES, 8) and batch["description_tokens"].dtype == np.int32
    assert batch["boxes"].shape == (8, MAX_BOXES, 4) and batch["boxes"].dtype == np.float32
    assert batch["box_mask"].shape == (8, MAX_BOXES) and batch["box_mask"].dtype == np.bool_
    # uint8 pixels (normalised on device): white left half, black right half (JPEG: within a few levels).
    np.testing.assert_allclose(batch["images"][:, 4, 2], 255, atol=8)
    np.testing.assert_allclose(batch["images"][:, 4, -3], 0, atol=8)
    for b, index in enumerate(_record_ids(batch)):
        record = _record(int(index))
        np.testing.assert_array_equal(batch["box_mask"][b], record["box_mask"])
        np.testing.assert_allclose(batch["boxes"][b], record["boxes"])
        long_caption = index % 3 == 0
        expected = record["caption_tokens"][:12].copy()
        expected[11] = EOT if long_caption else expected[11]  # truncation keeps EOT last
        np.testing.assert_array_equal(batch["caption_tokens"][b], expected)
        for m in range(MAX_BOXES):
            row = batch["description_tokens"][b, m]
            if record["box_mask"][m]:
                eot_at = min(3 + 7 * m, 7)
                assert row[0] == SOT and row[eot_at] == EOT and not row[eot_at + 1:].any()
            else:
                assert not row.any() and not batch["boxes"][b, m].any()
    assert 0 <= batch["boxes"].min() and batch["boxes"].max() <= 1


def test_record_parser_gives_tfds_values(data_dir):
    """The pipeline's own tf.Example parsing equals tfds's (image left encoded), feature by feature."""
    builder = tfds.builder_from_directory(data_dir)
    parse = pipeline._RecordParser(pipeline._check_schema(data_dir, builder.info.features))
    for split, count in (("train", NUM_TRAIN), ("validation", NUM_VALIDATION)):
        serialized = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        by_tfds = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        for index in range(count):
            ours, theirs = parse(serialized[index]), by_tfds[index]
            assert set(ours) == set(theirs) - {"box_scores"}  # the one feature the pipeline never reads
            for key, value in ours.items():
                expected = np.asarray(theirs[key])
                assert np.asarray(value).dtype == expected.dtype and np.asarray(value).shape == expected.shape, key
                np.testing.assert_array_equal(value, expected, err_msg=key)


def test_per_record_draws_are_grain_random_map_draws():
    """Caption and flip draws come from the rng grain's ``seed(s).random_map`` gives stream position i
    (what earlier versions of the pipeline used): a seed keeps its batches across versions."""
    seed = 123456789
    by_grain = grain.MapDataset.range(40).seed(seed).random_map(lambda _, rng: (rng.random(), rng.random()))
    key = pipeline._draw_key(seed)
    for position in range(40):
        rng = pipeline._position_rng(key, position)
        assert (rng.random(), rng.random()) == by_grain[position]


def test_same_seed_same_batches_other_seed_other_order(data_dir):
    config = _config(data_dir)
    first = _take(pipeline.make_train_iterator(config, global_batch_size=8, seed=3), 4)
    again = _take(pipeline.make_train_iterator(config, global_batch_size=8, seed=3), 4)
    other = _take(pipeline.make_train_iterator(config, global_batch_size=8, seed=4), 4)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(_stream_ids(first), _stream_ids(other))
    # Epoch 1 (batches 0-2) and epoch 2 (batch 3 on) are each a permutation, reshuffled.
    ids = _stream_ids(first)
    assert sorted(ids[:NUM_TRAIN]) == list(range(NUM_TRAIN))
    assert not np.array_equal(ids[NUM_TRAIN:], ids[:8])


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_order_and_resume_identical_for_0_1_2_workers(data_dir):
    """One stream whatever the worker count, and a state saved under one count resumes under any other."""
    def make(num_workers):
        return pipeline.make_train_iterator(_config(data_dir, num_workers=num_workers, prefetch=1),
                                            global_batch_size=8, seed=1)

    reference = _take(make(0), 4)  # batch 3 is in the second epoch
    two = make(2)
    first = _take(two, 2)
    state = two.get_state()
    _assert_same_batches(first + _take(two, 2), reference)
    two.close()
    assert state == {"next_index": 2}

    one = make(1)
    one.set_state(state)
    _assert_same_batches(_take(one, 1), reference[2:3])
    later = one.get_state()
    one.close()
    none = make(0)
    none.set_state(later)
    _assert_same_batches(_take(none, 1), reference[3:])


def test_state_restore_gives_next_batch(data_dir, tmp_path):
    config = _config(data_dir)
    iterator = pipeline.make_train_iterator(config, global_batch_size=8, seed=5)
    _take(iterator, 2)
    state = iterator.get_state()
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 2)

    from_state = pipeline.make_train_iterator(config, global_batch_size=8, seed=5)
    from_state.set_state(state)
    from_orbax = pipeline.make_train_iterator(config, global_batch_size=8, seed=5)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        from_orbax = manager.restore(2, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(from_orbax)))["data"]
    for resumed in (from_state, from_orbax):
        for a, b in zip(expected, _take(resumed, 2)):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_two_processes_split_disjoint_and_complete(data_dir):
    orders = []
    for process_index in range(2):
        iterator = pipeline.make_train_iterator(_config(data_dir), global_batch_size=8, seed=0,
                                                process_index=process_index, process_count=2)
        batches = _take(iterator, NUM_TRAIN // 8)  # one epoch: 3 batches of 4 per process
        assert all(b["images"].shape[0] == 4 for b in batches)
        orders.append(_stream_ids(batches))
    seen = [set(order.tolist()) for order in orders]
    assert len(seen[0]) == len(seen[1]) == NUM_TRAIN // 2
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(NUM_TRAIN))
    # The processes' slices are contiguous; their shuffles must differ, or the k-th records of
    # both slices would always share a global batch.
    assert not np.array_equal(orders[0] - orders[0].min(), orders[1] - orders[1].min())
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline.make_train_iterator(_config(data_dir), global_batch_size=7, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_mllm_caption_probability(data_dir, prob):
    iterator = pipeline.make_train_iterator(_config(data_dir, mllm_caption_prob=prob), global_batch_size=8, seed=0)
    firsts = np.concatenate([b["caption_tokens"][:, 1] for b in _take(iterator, 3)])
    ids = np.where(firsts >= MLLM_ID, firsts - MLLM_ID, firsts - CAPTION_ID)
    uses_mllm = firsts >= MLLM_ID
    np.testing.assert_array_equal(uses_mllm, (ids % 2 == 0) if prob == 1.0 else np.zeros_like(uses_mllm))


def test_mllm_caption_choice_mixes_and_is_per_record(data_dir):
    batches = _take(pipeline.make_train_iterator(_config(data_dir), global_batch_size=8, seed=0), 3)
    firsts = np.concatenate([b["caption_tokens"][:, 1] for b in batches])
    has_mllm = np.where(firsts >= MLLM_ID, firsts - MLLM_ID, firsts - CAPTION_ID) % 2 == 0
    chose_mllm = (firsts >= MLLM_ID)[has_mllm]
    assert 0 < chose_mllm.sum() < len(chose_mllm)


def test_flip_augmentation_flips_boxes(data_dir):
    plain, flipped = (next(pipeline.make_train_iterator(_config(data_dir, augment=augment, mllm_caption_prob=0.0),
                                                        global_batch_size=NUM_TRAIN, seed=0))
                      for augment in (False, True))
    np.testing.assert_array_equal(_record_ids(plain), _record_ids(flipped))  # same order, only flips differ
    was_flipped = flipped["images"][:, 4, 2, 0] < 128  # the bright half moved right
    assert 0 < was_flipped.sum() < NUM_TRAIN
    np.testing.assert_array_equal(flipped["images"][was_flipped], plain["images"][was_flipped][:, :, ::-1])
    expected_cx = np.where(plain["box_mask"], 1 - plain["boxes"][..., 0], 0)
    np.testing.assert_allclose(flipped["boxes"][was_flipped][..., 0], expected_cx[was_flipped], atol=1e-6)
    np.testing.assert_array_equal(flipped["boxes"][~was_flipped], plain["boxes"][~was_flipped])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_pads_without_double_counting(data_dir, process_count):
    ids = []
    for process_index in range(process_count):
        config = _config(data_dir, caption_length=CONTEXT)  # also covers the stored length, kept as is
        batches = list(pipeline.make_eval_iterator(config, global_batch_size=4 * process_count,
                                                   process_index=process_index, process_count=process_count))
        # 1 process: 11 records -> 3 batches of 4; 2 processes: slices of 6 and 5 -> 2 batches of 4 each.
        assert len(batches) == {1: 3, 2: 2}[process_count]
        for batch in batches:
            batch_lib.validate(batch)
            padding = ~batch["mask"]
            assert not batch["images"][padding].any() and not batch["caption_tokens"][padding].any()
            ids.extend(_record_ids(batch)[batch["mask"]].tolist())
    assert sorted(ids) == list(range(1000, 1000 + NUM_VALIDATION))


def test_to_global_on_fake_devices(data_dir):
    local = next(pipeline.make_eval_iterator(_config(data_dir), global_batch_size=8))
    mesh = create_mesh((4, 2, 1))
    for sharding in (mesh, NamedSharding(mesh, PartitionSpec(("data", "fsdp")))):
        arrays = pipeline.to_global(local, sharding)
        for key, value in local.items():
            assert arrays[key].shape == value.shape
            assert arrays[key].sharding.spec[0] == ("data", "fsdp")
            assert len(arrays[key].addressable_shards) == jax.device_count() == 8
            np.testing.assert_array_equal(np.asarray(arrays[key]), value)
            for shard in arrays[key].addressable_shards:  # one example per device
                assert shard.data.shape[0] == 1
                np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


def test_clear_errors(data_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        pipeline.make_train_iterator(_config(str(tmp_path / "missing")), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="split 'test' not found"):
        pipeline.make_eval_iterator(_config(data_dir), "test", global_batch_size=4)
    with pytest.raises(ValueError, match="mean must have 3 entries"):
        pipeline.make_train_iterator(_config(data_dir, mean=(0.5, 0.5)), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="std must have 3 entries"):
        pipeline.make_train_iterator(_config(data_dir, std=(0.5,) * 4), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="caption_length=78"):
        pipeline.make_train_iterator(_config(data_dir, caption_length=78), global_batch_size=4, seed=0)

    # A dataset whose boxes are xyxy pairs [M, 2, 2] instead of [M, 4].
    features = records.features(RESOLUTION, MAX_BOXES, CONTEXT)
    bad = tfds.features.FeaturesDict({**{k: features[k] for k in features.keys() if k != "boxes"},
                                      "boxes": tfds.features.Tensor(shape=(MAX_BOXES, 2, 2), dtype=np.float32)})
    record = _record(1)
    record["boxes"] = record["boxes"].reshape(MAX_BOXES, 2, 2)
    bad_dir = str(tmp_path / "bad")
    os.makedirs(bad_dir)
    num_bytes = records.write_shard(os.path.join(bad_dir, "shard"), [records.RecordSerializer(bad)(record)])
    records.publish_split(bad_dir, "train", [os.path.join(bad_dir, "shard")])
    records.write_tfds_metadata(bad_dir, bad, {"train": [1]}, {"train": num_bytes}, "bad boxes")
    with pytest.raises(ValueError, match="feature 'boxes' is float32\\[5, 2, 2\\]"):
        pipeline.make_train_iterator(_config(bad_dir), global_batch_size=1, seed=0)

    # A record whose JPEG bytes are truncated: named by its id, not a crash deep in PIL.
    truncated = dict(_record(3), image=_record(3)["image"][:50])
    truncated_dir = str(tmp_path / "truncated")
    os.makedirs(truncated_dir)
    num_bytes = records.write_shard(os.path.join(truncated_dir, "shard"), [records.RecordSerializer(features)(truncated)])
    records.publish_split(truncated_dir, "train", [os.path.join(truncated_dir, "shard")])
    records.write_tfds_metadata(truncated_dir, features, {"train": [1]}, {"train": num_bytes}, "truncated jpeg")
    with pytest.raises(ValueError, match="record 'record-3': cannot decode its image"):
        next(pipeline.make_train_iterator(_config(truncated_dir), global_batch_size=1, seed=0))

    # Built in a worker, the failed batch's block goes back to the worker (tests/test_loader.py: discard).
    monkeypatch.setattr(loader, "_worker_blocks", loader._WorkerBlocks())
    monkeypatch.setattr(loader, "MIN_SHARED_MEMORY_BYTES", 0)
    discarded = []
    monkeypatch.setattr(loader, "discard", lambda array, discard=loader.discard: discard(discarded.append(array) or array))
    with pytest.raises(ValueError, match="record 'record-3': cannot decode its image"):
        next(pipeline.make_train_iterator(_config(truncated_dir), global_batch_size=1, seed=0))
    assert len(discarded) == 1 and not loader._worker_blocks._lent
    for block in loader._worker_blocks._blocks[(1, RESOLUTION, RESOLUTION, 3), "|u1"]:
        block.unlink()


def test_prepared_texts_and_boxes_reach_the_batch(tmp_path):
    """prepare_dataset (raw texts, xyxy regions) -> pipeline: tokens and cxcywh boxes arrive intact."""
    from grain_jax.data import prepare, tokenizer

    raw = [{"id": f"img-{i}", "image": np.full((20, 30, 3), 40 * i, np.uint8), "caption": f"caption number {i}",
            "mllm_caption": f"a much longer mllm caption about picture {i}" if i % 2 else None,
            "regions": [{"description": f"part {i} on the left", "box": [0.1, 0.2, 0.5, 0.6], "score": 0.9}]}
           for i in range(4)]
    directory = str(tmp_path / "prepared")
    prepare.prepare_dataset({"train": raw}, directory, resolution=RESOLUTION, num_workers=0, progress=False)
    config = _config(directory, mllm_caption_prob=1.0, caption_length=7)
    batch = next(pipeline.make_train_iterator(config, global_batch_size=4, seed=0))
    # Which raw example each row is: its description reads "part <i> on the left".
    order = [int(text.split()[1]) for text in tokenizer.decode(batch["description_tokens"][:, 0])]
    assert sorted(order) == [0, 1, 2, 3]
    # MLLM caption where there is one, else the original; re-truncated to 7 tokens like tokenize(text, 7).
    texts = [raw[i]["mllm_caption"] or raw[i]["caption"] for i in order]
    np.testing.assert_array_equal(batch["caption_tokens"], tokenizer.tokenize(texts, 7))
    np.testing.assert_array_equal(batch["description_tokens"][:, 0],
                                  tokenizer.tokenize([raw[i]["regions"][0]["description"] for i in order], 8))
    np.testing.assert_array_equal(batch["box_mask"], np.arange(MAX_BOXES)[None].repeat(4, 0) < 1)
    np.testing.assert_allclose(batch["boxes"][:, 0], np.broadcast_to([0.3, 0.4, 0.4, 0.4], (4, 4)), atol=1e-6)
