"""Checkpointer on a toy state: corrupt-newest fallback, restore onto another mesh, init_from + dont_load."""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grain_jax import checkpoints, sharding
from grain_jax.train import resume
from grain_jax.train.state import TrainState


def _state(mesh, seed=0):
    """params {'w' [8,4] sharded over fsdp, 'b' [4] replicated}, adam moments sharded alike."""
    tx = optax.adam(1e-3)
    keys = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(keys[0], (8, 4)), "b": jax.random.normal(keys[1], (4,))}
    params_sh = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P())}
    params = jax.device_put(params, params_sh)
    opt_state = jax.jit(tx.init)(params)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state)
    return state, jax.tree.map(lambda x: x.sharding, state)


def _iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _save_steps(workdir, mesh, steps):
    ckpt = resume.Checkpointer(workdir, keep=5)
    state, _ = _state(mesh)
    it = _iterator()
    for step in steps:
        next(it)
        state = state.replace(step=jnp.int32(step), params=jax.tree.map(lambda x: x + 1, state.params))
        ckpt.save(state, jax.random.PRNGKey(7), it)
    ckpt.wait()
    ckpt.close()
    return state


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    mesh = sharding.create_mesh((2, 4, 1))
    _save_steps(str(tmp_path), mesh, [2, 4])
    newest = tmp_path / checkpoints.CHECKPOINTS / "4" / "params"
    for root, _, files in os.walk(newest):  # truncate every data file of step 4's params
        for name in files:
            if not name.startswith("_"):
                open(os.path.join(root, name), "wb").close()

    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    fresh, shardings = _state(mesh, seed=1)
    it = _iterator()
    state, rng = ckpt.restore(fresh, shardings, it)
    assert int(state.step) == 2
    assert "checkpoint step 4 is unreadable" in capsys.readouterr().out
    assert (tmp_path / resume.CORRUPT_DIR / "4").is_dir()
    assert ckpt.latest_step() == 2
    np.testing.assert_array_equal(rng, np.asarray(jax.random.PRNGKey(7)))
    assert next(it) == 1  # the data iterator resumes after the one element consumed before step 2
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    saved = _save_steps(str(tmp_path), sharding.create_mesh((8, 1, 1)), [3])
    other = sharding.create_mesh((2, 2, 2), devices=jax.devices()[:8])
    fresh, shardings = _state(other, seed=1)
    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    state, _ = ckpt.restore(fresh, shardings, _iterator())
    ckpt.close()
    assert state.params["w"].sharding == NamedSharding(other, P("fsdp", None))
    for restored, original in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))


def test_restore_without_checkpoints_returns_none(tmp_path):
    fresh, shardings = _state(sharding.create_mesh((8, 1, 1)))
    ckpt = resume.Checkpointer(str(tmp_path), keep=2)
    assert ckpt.restore(fresh, shardings, _iterator()) is None
    ckpt.close()


def test_init_from_loads_all_but_dont_load(tmp_path):
    mesh = sharding.create_mesh((8, 1, 1))
    source, _ = _state(mesh, seed=0)
    checkpoints.save_params(str(tmp_path), {"w": source.params["w"]},
                            checkpoints.ModelSpec(model_name="toy"))
    fresh, shardings = _state(mesh, seed=1)
    merged = resume.load_init_params(str(tmp_path), fresh.params, shardings.params, dont_load=["b"])
    np.testing.assert_array_equal(merged["w"], source.params["w"])
    np.testing.assert_array_equal(merged["b"], fresh.params["b"])
    assert merged["w"].sharding == shardings.params["w"]
    with pytest.raises(ValueError, match="b is missing from the checkpoint"):
        resume.load_init_params(str(tmp_path), fresh.params, shardings.params)
