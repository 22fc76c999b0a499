"""Elastic resume on a toy state: another process count re-derives the data position; mismatches refuse."""

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
from test_train_checkpointing import _iterator, _save_steps, _state


def _as_if_written_by(workdir, step: int, process_count: int) -> None:
    """Rewrites step's data item as ``process_count`` processes would have left it."""
    data = workdir / checkpoints.CHECKPOINTS / str(step) / "data"
    saved = data / "process_0-of-1.json"
    state = saved.read_text()
    saved.unlink()
    for index in range(process_count):
        (data / f"process_{index}-of-{process_count}.json").write_text(state)


def test_other_process_count_rederives_the_data_position(tmp_path, capsys):
    mesh = sharding.create_mesh((8, 1, 1))
    saved = _save_steps(str(tmp_path), mesh, [3])  # the toy iterator was read once: next_index 1, step 3
    _as_if_written_by(tmp_path, 3, process_count=2)

    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    fresh, shardings = _state(sharding.create_mesh((2, 4, 1)), seed=1)
    it = _iterator()
    state, _ = ckpt.restore(fresh, shardings, it)
    ckpt.close()
    assert int(state.step) == 3
    for restored, original in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))
    assert next(it) == 3  # batch `step` of this layout's stream, not the saved per-process state
    out = capsys.readouterr().out
    assert ("data position re-derived: the checkpoint was written by 2 process(es), this run has 1; every process "
            "continues its own data stream at batch 3") in out
    assert not (tmp_path / resume.CORRUPT_DIR).exists()


def test_same_process_count_restores_the_saved_data_state(tmp_path, capsys):
    _save_steps(str(tmp_path), sharding.create_mesh((8, 1, 1)), [3])
    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    fresh, shardings = _state(sharding.create_mesh((8, 1, 1)), seed=1)
    it = _iterator()
    ckpt.restore(fresh, shardings, it)
    ckpt.close()
    assert next(it) == 1  # exactly the saved iterator state
    assert "data position restored from the checkpoint (written by 1 process(es)" in capsys.readouterr().out


def test_other_model_shapes_refuse_and_move_nothing(tmp_path):
    mesh = sharding.create_mesh((8, 1, 1))
    _save_steps(str(tmp_path), mesh, [2])
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros((4,)), "extra_bias": jnp.zeros((2,))}
    other = TrainState(step=jnp.int32(0), params=params, opt_state=optax.adam(1e-3).init(params))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), other)
    ckpt = resume.Checkpointer(str(tmp_path), keep=5)
    with pytest.raises(resume.CheckpointMismatch) as error:
        ckpt.restore(other, shardings, _iterator())
    ckpt.close()
    message = str(error.value)
    assert "checkpoint step 2" in message and "nothing was moved" in message
    assert "params['extra_bias'] is missing from the checkpoint" in message
    assert "params['w'] has shape (8, 4) in the checkpoint, this model has (8, 6)" in message
    assert (tmp_path / checkpoints.CHECKPOINTS / "2").is_dir()
    assert not (tmp_path / resume.CORRUPT_DIR).exists()


def test_other_global_batch_refuses(tmp_path):
    mesh = sharding.create_mesh((8, 1, 1))
    ckpt = resume.Checkpointer(str(tmp_path), keep=5, run={"global_batch_size": 64, "seed": 0})
    state, shardings = _state(mesh)
    ckpt.save(state.replace(step=jnp.int32(1)), jax.random.PRNGKey(0), _iterator())
    ckpt.wait()
    ckpt.close()
    ckpt = resume.Checkpointer(str(tmp_path), keep=5, run={"global_batch_size": 128, "seed": 0})
    with pytest.raises(resume.CheckpointMismatch,
                       match="global_batch_size=64 in the checkpoint, 128 in this run"):
        ckpt.restore(state, shardings, _iterator())
    ckpt.close()
    assert (tmp_path / checkpoints.CHECKPOINTS / "1").is_dir()


def test_data_state_at_matches_a_multiprocess_iterator():
    """The re-derived state of an mp_prefetch iterator equals the state it reaches by reading."""
    dataset = grain.MapDataset.range(40).batch(2).to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=3, per_worker_buffer_size=1))
    it = iter(dataset)
    fresh = it.get_state()
    for batches in range(5):
        assert it.get_state() == resume.data_state_at(fresh, batches)
        next(it)
    positioned = iter(dataset)
    positioned.set_state(resume.data_state_at(fresh, 4))
    np.testing.assert_array_equal(next(positioned), [8, 9])


def test_sharding_excess_and_the_sufficiently_sharded_check():
    import ml_collections
    from grain_jax.train import trainer
    mesh = sharding.create_mesh((1, 4, 2))
    tree = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None))),
            "b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    excess, replicated = sharding.sharding_excess(tree)
    # 144 bytes in all, ideally 144 / (fsdp 4 x tensor 2) = 18 per device; each device holds 32 + 16.
    assert excess == pytest.approx(48 / 18 - 1)
    assert replicated == [("['b']", 16)]
    assert sharding.sharding_excess({"w": tree["w"].update(sharding=NamedSharding(mesh, P("fsdp", "tensor")))})[0] == 0
    state = TrainState(step=None, params=tree, opt_state={})
    config = ml_collections.ConfigDict({"sharding_check": {"max_excess": 0.5, "action": "fail"}})
    with pytest.raises(ValueError, match=r"use 166.7% more bytes per device .*\.max_excess=0.5; largest replicated: "
                                         r"\['params'\]\['b'\] \(0.0 MiB\)"):
        trainer.check_sufficiently_sharded(state, config)
    config.sharding_check.max_excess = 2.0
    assert trainer.check_sufficiently_sharded(state, config) == pytest.approx(excess)
