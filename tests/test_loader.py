"""BatchIterator (worker-count-independent state, batches built in shared memory by workers), DevicePrefetch
(state of the unseen batch) and transforms."""
from multiprocessing import shared_memory

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from grain_jax.data import loader, transforms


def _batches(num_records=20, batch_size=4):
    """Batch k = {"x": [4k, 4k+1, 4k+2, 4k+3]} (finite: 5 batches)."""
    return grain.MapDataset.range(num_records).map(lambda i: {"x": np.int64(i)}).batch(batch_size)


def _xs(batches):
    return [b["x"].tolist() for b in batches]


def test_batch_iterator_state_is_the_next_batch_index_and_reads_grains_own_state():
    iterator = loader.BatchIterator(_batches(), num_workers=0, prefetch=2)
    assert _xs([next(iterator), next(iterator)]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert iterator.get_state() == {"next_index": 2}
    # A state written by grain's own in-process iterator (the format of earlier checkpoints).
    grains = iter(_batches().to_iter_dataset())
    for _ in range(3):
        next(grains)
    resumed = loader.BatchIterator(_batches(), num_workers=0)
    resumed.set_state(grains.get_state())
    assert _xs(resumed) == [[12, 13, 14, 15], [16, 17, 18, 19]]  # then StopIteration: finite datasets end
    with pytest.raises(ValueError, match="must be \\{'next_index': k\\}, got keys \\['workers_state'\\]"):
        resumed.set_state({"workers_state": {}})


def test_batch_iterator_reads_the_state_of_grains_multi_worker_iterator():
    """Checkpoints written before BatchIterator with num_workers > 0 hold grain's per-worker state."""
    batches = grain.MapDataset.range(40).batch(4)
    workers = iter(batches.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    assert [next(workers).tolist() for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    state = workers.get_state()
    workers.close()
    resumed = loader.BatchIterator(batches)
    resumed.set_state(state)
    assert next(resumed).tolist() == [12, 13, 14, 15] and resumed.get_state() == {"next_index": 4}


def _big_batch(k):
    """Batch k: "image" [64,64,64] uint8 (256 KiB, a ``batch_array``) = k + 1 in row k % 64, else 0; "k" [1];
    "in_shared_memory" [] bool: whether ``batch_array`` built the image in a block (a view, not a new array)."""
    image = loader.batch_array((64, 64, 64), np.uint8)
    image[k % 64] = k + 1
    return {"image": image, "k": np.array([k]), "in_shared_memory": np.array(not image.flags.owndata)}


def test_batches_built_in_workers_blocks_equal_in_process_ones_and_blocks_are_reused_only_when_dropped():
    # Far more batches than grain can hold in flight (each worker's queue, the one it builds, the reader's
    # buffer), so that blocks must come back however far the workers run ahead of a slow (loaded) consumer.
    count = 60
    expected = [_big_batch(k) for k in range(count)]
    assert not any(batch["in_shared_memory"] for batch in expected)
    for num_workers in (1, 2):
        iterator = loader.BatchIterator(grain.MapDataset.range(count).map(_big_batch), num_workers=num_workers)
        kept = {}
        for k, batch in enumerate(iterator):
            assert batch["in_shared_memory"]  # so only a handle crossed the queue (module doc)
            if k % 15 == 0:
                kept[k] = batch  # held: its block must not be refilled meanwhile
        assert k == count - 1 and len(kept) == 4
        for k, batch in kept.items():
            for key in ("image", "k"):
                np.testing.assert_array_equal(batch[key], expected[k][key], err_msg=f"{num_workers} workers, {key}")
        names = list(iterator._received._open)
        assert len(names) < count // 2  # the dropped batches' blocks came back
        assert not any(map(_shared_memory_exists, names))  # unlinked once mapped: nothing can leak
        iterator.close()


def _shared_memory_exists(name):
    try:
        block = shared_memory.SharedMemory(name)
    except FileNotFoundError:
        return False
    block.close()  # (and left registered: the resource tracker unlinks it at exit)
    return True


def test_batch_array_in_a_worker_reuses_a_discarded_block_zero_filled(monkeypatch):
    blocks = loader._WorkerBlocks()
    monkeypatch.setattr(loader, "_worker_blocks", blocks)
    assert type(loader.batch_array((4, 4), np.int32)) is np.ndarray  # small arrays go pickled
    first = loader.batch_array((512, 256), np.uint8)
    assert not first.flags.owndata and not first.any()
    first[:] = 7
    second = loader.batch_array((512, 256), np.uint8)
    assert not np.shares_memory(first, second)  # first is still lent
    loader.discard(first)
    third = loader.batch_array((512, 256), np.uint8)
    assert np.shares_memory(first, third) and not third.any()  # first's block, zero-filled again
    for block in blocks._blocks[(512, 256), "|u1"]:
        block.unlink()


def test_resolve_num_workers():
    assert loader.resolve_num_workers(3) == 3 and loader.resolve_num_workers(0) == 0
    assert [loader.resolve_num_workers(-1, cores=c) for c in (1, 2, 9, 64)] == [1, 1, 8, loader.MAX_AUTO_WORKERS]
    with pytest.raises(ValueError, match="data.num_workers must be >= 0, or -1"):
        loader.resolve_num_workers(-2)


def test_device_prefetch_reports_the_state_of_the_first_unseen_batch(tmp_path):
    placed = []

    def place(batch):
        placed.append(batch["x"][0])
        return jax.device_put(batch)

    prefetch = loader.DevicePrefetch(loader.BatchIterator(_batches()), place, size=1)
    first = next(prefetch)
    assert isinstance(first["x"], jax.Array) and first["x"].tolist() == [0, 1, 2, 3]
    assert placed == [0, 4]  # the next batch is already on its way to the device
    assert prefetch.get_state() == {"next_index": 1} and prefetch.batch_bytes == 4 * 8
    assert prefetch.data_wait_s > 0
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(prefetch)))
        manager.wait_until_finished()
    rest = _xs(prefetch)
    assert rest == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]

    restored = loader.DevicePrefetch(loader.BatchIterator(_batches()), jax.device_put, size=2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert _xs(restored) == rest


def test_normalize_uint8_on_device_matches_the_formula_and_checks_its_statistics():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    expected = (images / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    got = jax.jit(lambda x: transforms.normalize(x, IMAGENET_MEAN, IMAGENET_STD))(images)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    bf16 = transforms.normalize(images, IMAGENET_MEAN, IMAGENET_STD, dtype=np.dtype("bfloat16"))
    np.testing.assert_allclose(np.asarray(bf16, np.float32), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="data.mean must have 3 entries"):
        transforms.normalize(images, (0.5, 0.5), IMAGENET_STD)
    with pytest.raises(ValueError, match="data.std must be positive"):
        transforms.normalize(images, IMAGENET_MEAN, (0.2, 0.0, 0.2))
