"""Checkpoint safety: a flipped bit in params / opt_state data is caught on restore (the step is skipped);
a full disk during a save is one clear error and the last committed step stays resumable."""
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grain_jax import checkpoints, sharding
from grain_jax.train import disk_space, integrity, resume
from grain_jax.train.state import TrainState


def _state(mesh, seed):
    """params {'w' [64,256]} sharded over fsdp (chunks large enough that OCDBT stores them out of its
    CRC-checked b-tree nodes, as a real model's are), adam moments filled with random values."""
    tx = optax.adam(1e-3)
    keys = jax.random.split(jax.random.key(seed), 3)
    fsdp, repl = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P())
    params = {"w": jax.device_put(jax.random.normal(keys[0], (64, 256)), fsdp)}
    adam = tx.init(params)[0]
    opt_state = (adam._replace(count=jax.device_put(jnp.int32(3), repl),
                               mu={"w": jax.device_put(jax.random.normal(keys[1], (64, 256)), fsdp)},
                               nu={"w": jax.device_put(jax.random.uniform(keys[2], (64, 256)), fsdp)}),
                 optax.EmptyState())
    state = TrainState(step=jax.device_put(jnp.int32(0), repl), params=params, opt_state=opt_state)
    return state, jax.tree.map(lambda x: x.sharding, state)


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save(workdir, mesh, steps):
    """Saves a different state at each step; returns {step: state}."""
    ckpt, it, saved = resume.Checkpointer(workdir, keep=5), _iterator(), {}
    for step in steps:
        next(it)
        state, _ = _state(mesh, seed=step)
        saved[step] = state.replace(step=jax.device_put(jnp.int32(step), state.step.sharding))
        ckpt.save(saved[step], jax.random.PRNGKey(step), it)
    ckpt.wait()
    ckpt.close()
    return saved


def _flip_one_bit(item_dir):
    """Flips one bit in the middle of the item's largest array data file."""
    data_dir = os.path.join(item_dir, "ocdbt.process_0", "d")
    path = max((os.path.join(data_dir, name) for name in os.listdir(data_dir)), key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("item,array", [("params", "params/w"), ("opt_state", "opt_state/0/")])
def test_flipped_bit_is_detected_and_falls_back(tmp_path, capsys, item, array):
    mesh = sharding.create_mesh((8, 1, 1))
    saved = _save(str(tmp_path), mesh, [2, 4])
    _flip_one_bit(str(tmp_path / checkpoints.CHECKPOINTS / "4" / item))

    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    fresh, shardings = _state(mesh, seed=0)
    it = _iterator()
    state, rng = ckpt.restore(fresh, shardings, it)
    ckpt.close()
    out = capsys.readouterr().out
    assert "WARNING: checkpoint step 4 is unreadable (checkpoint step 4 is corrupt: " + array in out, out
    assert "differ from the digest recorded at save time" in out
    assert (tmp_path / resume.CORRUPT_DIR / "4").is_dir()
    assert int(state.step) == 2
    for restored, original in zip(jax.tree.leaves(state), jax.tree.leaves(saved[2])):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))
    np.testing.assert_array_equal(rng, np.asarray(jax.random.PRNGKey(2)))
    assert next(it) == 1


def test_intact_checkpoint_verifies_on_another_mesh(tmp_path, capsys):
    saved = _save(str(tmp_path), sharding.create_mesh((8, 1, 1)), [3])
    fresh, shardings = _state(sharding.create_mesh((2, 2, 2)), seed=0)
    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    state, _ = ckpt.restore(fresh, shardings, _iterator())
    ckpt.close()
    assert "WARNING" not in capsys.readouterr().out
    for restored, original in zip(jax.tree.leaves(state), jax.tree.leaves(saved[3])):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))


def test_checkpoint_without_digests_restores_unverified(tmp_path, capsys):
    """Checkpoints written before digests existed stay readable (never moved or ignored)."""
    saved = _save(str(tmp_path), sharding.create_mesh((8, 1, 1)), [3])
    shutil.rmtree(tmp_path / checkpoints.CHECKPOINTS / "3" / integrity.ITEM)
    fresh, shardings = _state(sharding.create_mesh((8, 1, 1)), seed=0)
    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    state, _ = ckpt.restore(fresh, shardings, _iterator())
    ckpt.close()
    assert "checkpoint step 3 has no integrity digests this version can check" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(saved[3].params["w"]))


def test_digest_sees_every_single_bit_and_element_order():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    reference = integrity.digests({"a": {"x": x}})["a"]["x"]
    seen = {reference}
    for flat in range(x.size):
        for bit in (0, 13, 31):
            flipped = x.copy().view(np.uint32)
            flipped.reshape(-1)[flat] ^= np.uint32(1 << bit)
            seen.add(integrity.digests({"a": {"x": flipped.view(np.float32)}})["a"]["x"])
    assert len(seen) == 1 + 3 * x.size
    two_signs = x.copy()
    two_signs[0, :2] *= -1  # two sign-bit flips cancel in the plain sum
    assert integrity.digests({"a": {"x": two_signs}})["a"]["x"] != reference
    swapped = x.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert integrity.digests({"a": {"x": swapped}})["a"]["x"] != reference
    bf16 = integrity.digests({"a": {"x": jnp.asarray(x, jnp.bfloat16), "k": jax.random.key(1)}})["a"]
    assert set(bf16) == {"x", "k"}


def _definition(x) -> str:
    """The digest as the module docstring defines it, element by element in Python integers."""
    x = np.asarray(x)
    words = x[..., None].view(np.uint32) if x.dtype.itemsize == 8 else x.view(f"uint{8 * x.dtype.itemsize}")
    words = [int(w) for w in words.reshape(-1)]
    return f"{sum(words) % 2**64:016x}{sum(i * w for i, w in enumerate(words)) % 2**64:016x}"


_ARRAYS = {  # sizes that take each host route: one run summed as a matrix (plus a remainder), small runs, blocks
    "matrix": np.random.default_rng(1).standard_normal((40, 1000)).astype(np.float32),
    "vector": np.random.default_rng(2).standard_normal((40002,)).astype(np.float32),
    "small": np.random.default_rng(3).standard_normal((3, 5, 7)).astype(np.float32),
    "bf16": np.random.default_rng(4).standard_normal((16, 48)).astype(jnp.bfloat16),
    "int8": np.arange(-64, 64, dtype=np.int8).reshape(8, 16),
    "scalar": np.float32(-2.5), "bool": np.array([True, False, True]), "empty": np.zeros((0, 4), np.float32),
}


@pytest.mark.parametrize("spec", [P(), P("data"), P(None, "fsdp"), P(("data", "fsdp"), "tensor")])
def test_digest_matches_its_definition_on_host_and_device_for_any_sharding(spec):
    """numpy (host arrays, CPU devices) and jitted (accelerator) sums agree with the definition, whatever the mesh."""
    mesh = sharding.create_mesh((2, 2, 2))

    def fits(x):  # rank and divisibility
        return len(spec) <= np.ndim(x) and all(x.shape[d] % np.prod([mesh.shape[a] for a in np.atleast_1d(axes)]) == 0
                                               for d, axes in enumerate(spec) if axes)

    arrays = {name: x for name, x in _ARRAYS.items() if fits(x)}
    placed = {name: jax.device_put(x, NamedSharding(mesh, spec)) for name, x in arrays.items()}
    expected = {name: _definition(x) for name, x in arrays.items()}
    assert integrity.digests({"a": placed})["a"] == expected
    device = integrity._device_sums(list(placed.values()), mesh)
    assert {name: f"{s:016x}{p:016x}" for name, (s, p) in zip(placed, device)} == expected


def test_digest_of_host_values_covers_all_64_bits():
    extra = {"step": np.int64(2**40 + 5), "rng": np.asarray(jax.random.PRNGKey(3))}
    record = integrity.digests({"extra": extra})["extra"]
    assert record == {name: _definition(x) for name, x in extra.items()}
    assert integrity.digests({"extra": {"step": np.int64(5)}})["extra"]["step"] != record["step"]


# A full disk during a save: one clear error, the last committed step untouched and resumable.

_DISK_FULL = ('RESOURCE_EXHAUSTED: Error writing "w/1.0" in OCDBT database: Failed to write 88620 bytes to file 5: '
              "No space left on device [os_error_code='28']")


def _save_then_fail(workdir, mesh, expect):
    """Saves step 2, then step 4 (which must fail with DiskFullError); returns (saved step 2, error)."""
    saved = _save(workdir, mesh, [2])
    ckpt, it = resume.Checkpointer(workdir, keep=5), _iterator()
    state, _ = _state(mesh, seed=4)
    with pytest.raises(disk_space.DiskFullError) as error:
        ckpt.save(state.replace(step=jax.device_put(jnp.int32(4), state.step.sharding)), jax.random.PRNGKey(4), it)
        ckpt.wait()
    ckpt.close()
    assert expect in str(error.value)
    return saved[2], str(error.value)


def _assert_resumes_from_step_2(workdir, mesh, saved):
    directory = os.path.join(workdir, checkpoints.CHECKPOINTS)
    assert sorted(os.listdir(directory)) == ["2"]  # no partial step-4 directory left
    ckpt = resume.Checkpointer(workdir, keep=5)
    fresh, shardings = _state(mesh, seed=0)
    state, _ = ckpt.restore(fresh, shardings, _iterator())
    ckpt.close()
    for restored, original in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))


def test_save_refused_when_free_space_is_known_to_be_too_small(tmp_path, monkeypatch):
    mesh = sharding.create_mesh((8, 1, 1))
    usage = shutil.disk_usage(tmp_path)
    real_usage, calls = shutil.disk_usage, []

    def little_space_after_first_save(path):
        calls.append(path)
        if os.path.isdir(os.path.join(tmp_path, checkpoints.CHECKPOINTS, "2")):
            return usage._replace(free=1000)
        return real_usage(path)

    monkeypatch.setattr(disk_space.shutil, "disk_usage", little_space_after_first_save)
    needed = 3 * 64 * 256 * 4 / 2**20  # w, mu, nu in float32
    saved, message = _save_then_fail(str(tmp_path), mesh, expect=(
        f"not enough disk space to save checkpoint step 4 under {tmp_path / checkpoints.CHECKPOINTS}: "
        f"about {needed:.1f} MiB needed, 0.0 MiB free; the last committed checkpoint (step 2) is untouched"))
    assert "\n" not in message
    _assert_resumes_from_step_2(str(tmp_path), mesh, saved)


def test_disk_full_while_writing_is_one_clear_error(tmp_path, monkeypatch):
    """The writer fails the way tensorstore does on ENOSPC, after the free-space check passed."""
    from orbax.checkpoint._src.serialization import serialization
    mesh = sharding.create_mesh((8, 1, 1))
    real_write = serialization.async_serialize_from_host

    async def write(value, tspec, **kwargs):
        if ".orbax-checkpoint-tmp" in str(tspec) and "/4." in str(tspec):
            raise ValueError(_DISK_FULL)
        return await real_write(value, tspec, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)
    saved, _ = _save_then_fail(str(tmp_path), mesh, expect=(
        f"not enough disk space to save checkpoint step 4 under {tmp_path / checkpoints.CHECKPOINTS}: about "))
    _assert_resumes_from_step_2(str(tmp_path), mesh, saved)
