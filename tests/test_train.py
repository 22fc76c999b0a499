"""The train step and loop in-process on 8 fake CPU devices (runlocal demo model)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _train_utils
from grain_jax import batch as batch_lib, models, sharding
from grain_jax.inference import objective
from grain_jax.losses import LossConfig
from grain_jax.train import resume, state as state_lib, step as step_lib, trainer


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def _setup(config, mesh):
    rules = sharding.axis_rules()
    schedule = trainer.schedule_from_config(config, total_steps=config.total_steps, warmup_steps=config.warmup_steps)
    model = state_lib.build_model(config)
    state, shardings, tx = state_lib.create_train_state(
        model, lambda p: trainer.optimizer_from_config(config, p, schedule), mesh, rules, jax.random.PRNGKey(0))
    return model, schedule, tx, state, shardings, rules


def _image_stats(config):
    return {"mean": config.data.mean, "std": config.data.std}


def _fixed_batch(config):
    data = config.data
    return batch_lib.fake_batch(config.global_batch_size, data.image_size, data.caption_length,
                                data.description_length, data.max_boxes, seed=3)


def test_loss_decreases_on_a_fixed_batch_and_bad_steps_are_skipped(tmp_path):
    config = _train_utils.runlocal_config(str(tmp_path))
    mesh = sharding.create_mesh((8, 1, 1))
    model, schedule, tx, state, shardings, rules = _setup(config, mesh)
    train_step = step_lib.make_train_step(model, LossConfig(**config.loss), tx, schedule, **_image_stats(config))
    compiled = trainer.compile_train_step(train_step, state, shardings, sharding.batch_sharding(mesh, rules),
                                          mesh, rules, config)
    batch_sh = sharding.batch_sharding(mesh, rules)
    batch = {k: jax.device_put(v, batch_sh) for k, v in _fixed_batch(config).items()}
    rng = jax.device_put(jax.random.PRNGKey(1), state_lib.replicated(mesh))
    losses = []
    for _ in range(config.total_steps):
        state, metrics = compiled(state, batch, rng)
        losses.append(float(metrics["loss/total"]))
        assert 0.0 <= float(state.params["logit_scale"]) <= math.log(100.0)
    assert int(state.step) == config.total_steps
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    before = jax.device_get(state.params)
    poisoned = dict(batch, boxes=jnp.full_like(batch["boxes"], jnp.nan))  # uint8 images cannot hold NaN
    state, metrics = compiled(state, poisoned, rng)
    assert float(metrics["finite"]) == 0.0
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(old, np.asarray(new))


def test_cpu_compiler_options_keep_the_step_bit_identical_with_fewer_temporaries(tmp_path, monkeypatch):
    assert trainer.compiler_options("cpu") == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert trainer.compiler_options("gpu") == trainer.compiler_options("tpu") == {}
    config = _train_utils.runlocal_config(str(tmp_path))
    mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, schedule, tx, state, shardings, rules = _setup(config, mesh)
    train_step = step_lib.make_train_step(model, LossConfig(**config.loss), tx, schedule, **_image_stats(config))
    batch_sh = sharding.batch_sharding(mesh, rules)
    batch = {k: jax.device_put(v, batch_sh) for k, v in _fixed_batch(config).items()}
    rng = jax.device_put(jax.random.PRNGKey(1), state_lib.replicated(mesh))

    def two_steps():
        compiled = trainer.compile_train_step(train_step, state, shardings, batch_sh, mesh, rules, config)
        trained = jax.tree.map(jnp.copy, state)  # the step donates its state
        for _ in range(2):
            trained, _ = compiled(trained, batch, rng)
        return compiled.memory_analysis().temp_size_in_bytes, jax.device_get(trained.params)

    ours_temp, ours = two_steps()
    monkeypatch.setattr(trainer, "_COMPILER_OPTIONS", {})  # XLA's default scheduler
    default_temp, default = two_steps()
    assert ours_temp < 0.9 * default_temp, (ours_temp, default_temp)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_loss_equals_unsharded(tmp_path, mesh_shape):
    config = _train_utils.runlocal_config(str(tmp_path), dtype="float32")
    one_device = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    model, _, _, state, _, rules = _setup(config, one_device)
    params = jax.device_get(state.params)
    loss_config = LossConfig(**config.loss)
    batch = _fixed_batch(config)

    def loss_on(mesh):
        boxed = models.abstract_params(model)
        params_sh = state_lib.param_shardings(boxed, mesh, rules)
        placed = jax.device_put(params, params_sh)
        placed_batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
        fn = jax.jit(lambda p, b: objective.forward_loss(model, loss_config, p, b, jax.random.PRNGKey(0),
                                                        train=False, **_image_stats(config))[0])
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return float(fn(placed, placed_batch))

    np.testing.assert_allclose(loss_on(sharding.create_mesh(mesh_shape)), loss_on(one_device), rtol=2e-5)


@pytest.mark.parametrize("poisoned,where", [
    (3, "the last good checkpoint is step 2 in "),
    (1, "no checkpoint was saved yet"),
])
def test_non_finite_loss_stops_naming_the_metric_and_the_last_good_checkpoint(tmp_path, data_cache, monkeypatch,
                                                                              poisoned, where):
    from grain_jax.data import pipeline
    to_global, calls = pipeline.to_global, []

    def poison_one_batch(batch, batch_sharding):
        calls.append(1)
        if len(calls) == poisoned:
            batch = dict(batch, boxes=np.full_like(batch["boxes"], np.nan))
        return to_global(batch, batch_sharding)

    monkeypatch.setattr(pipeline, "to_global", poison_one_batch)
    config = _train_utils.runlocal_config(data_cache, checkpoint_every_steps=2)
    with pytest.raises(FloatingPointError, match=rf"non-finite .*loss/total.* at step {poisoned} \(values: .*nan"
                                                 rf".*training stopped; {where}"):
        trainer.train_and_evaluate(config, str(tmp_path))
    ckpt = resume.Checkpointer(str(tmp_path), keep=2)
    assert ckpt.latest_step() == (2 if poisoned == 3 else None)
    ckpt.close()


@pytest.mark.parametrize("profile_steps", [(2, 4), (10, 20)], ids=["inside", "past_the_end"])
def test_profile_steps_write_a_trace(tmp_path, data_cache, profile_steps):
    """config.profile_steps traces steps [start, stop) into WORKDIR/profile; a stop past the last step still
    closes the trace when training ends (TOTAL_STEPS = 12)."""
    config = _train_utils.runlocal_config(data_cache, profile_steps=profile_steps)
    trainer.train_and_evaluate(config, str(tmp_path))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_length_buckets_compile_one_step_per_length_and_resume_exactly(tmp_path, data_cache, monkeypatch):
    """config.data.text_length_buckets: the synthetic captions need 24-27 tokens and the descriptions 10, so
    buckets (12, 25) cut the captions to 25 or leave them at 32 (both within the 12 steps) and the
    descriptions to 12. The full lengths are compiled first, then each length once, on first use; a run
    preempted at step 5 resumes to the uninterrupted run's parameters, loading every step it compiles
    from the persistent cache."""
    import os
    import signal
    from grain_jax import checkpoints
    from grain_jax.data import pipeline

    def config():
        config = _train_utils.runlocal_config(data_cache, checkpoint_every_steps=2)
        config.data.update(caption_length=32, description_length=16, text_length_buckets=(12, 25))
        return config

    hits, compiles, placed, preempt_at = [], [], [], []
    compile_fn, to_global = trainer.compile_train_step, pipeline.to_global

    def count_hits(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    def counting_compile(*args):
        before = len(hits)
        compiled = compile_fn(*args)
        compiles.append((args[-1], len(hits) > before))  # (text lengths, loaded from the persistent cache)
        return compiled

    def recording_to_global(batch, batch_sharding):
        placed.append((batch["caption_tokens"].shape[-1], batch["description_tokens"].shape[-1]))
        if len(placed) == 6 and preempt_at:  # placed while step 5 runs next: preempted after it
            os.kill(os.getpid(), signal.SIGTERM)
        return to_global(batch, batch_sharding)

    monkeypatch.setattr(trainer, "compile_train_step", counting_compile)
    monkeypatch.setattr(pipeline, "to_global", recording_to_global)
    jax.monitoring.register_event_listener(count_hits)
    try:
        trainer.train_and_evaluate(config(), str(tmp_path / "reference"))
        used = list(dict.fromkeys(placed[:_train_utils.TOTAL_STEPS]))  # the last placement is never stepped
        assert sorted(used) == [(25, 12), (32, 12)], placed
        assert [lengths for lengths, _ in compiles] == [None] + [u for u in used if u != (32, 16)]

        del placed[:]
        preempt_at.append(5)
        interrupted = str(tmp_path / "interrupted")
        trainer.train_and_evaluate(config(), interrupted)
        ckpt = resume.Checkpointer(interrupted, keep=2)
        assert ckpt.latest_step() == 5
        ckpt.close()
        del compiles[:], placed[:], preempt_at[:]
        trainer.train_and_evaluate(config(), interrupted)
    finally:
        jax.monitoring.unregister_event_listener(count_hits)
    resumed_lengths = list(dict.fromkeys(placed[:_train_utils.TOTAL_STEPS - 5]))
    assert [lengths for lengths, _ in compiles] == [None] + [u for u in resumed_lengths if u != (32, 16)]
    assert all(cached for _, cached in compiles), compiles
    expected = checkpoints.restore_params(str(tmp_path / "reference"))
    resumed = checkpoints.restore_params(interrupted)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_description_budget_packs_the_batches_that_fit_and_runs_the_others_with_every_slot(tmp_path, monkeypatch):
    """With 8 description slots per image the synthetic scenes fill some and leave others empty (52-60 valid of
    a batch's 64 slots), so at model.description_budget=0.85 (56 rows) some batches fit and some do not.
    Those that fit are packed, the others run the every-slot step (compiled on first use); every step's losses
    are budget 1's (fp32; up to reduction order), and txt/description_overflow says which steps were over the
    budget, as decided on the host."""
    import json
    from grain_jax.models import text_batching
    fit_batch, decisions = text_batching.fit_batch, []

    def recording_fit_batch(*args):
        fitted, packed = fit_batch(*args)
        decisions.append(packed)
        return fitted, packed

    monkeypatch.setattr(text_batching, "fit_batch", recording_fit_batch)

    def run(budget):
        config = _train_utils.runlocal_config(str(tmp_path / "data"), total_steps=4, log_every_steps=1,
                                              checkpoint_every_steps=4)
        config.synthetic.max_boxes = 8
        config.data.max_boxes = 8
        config.model.description_budget = budget
        config.dtype = "float32"  # bf16 would round the packed and the every-slot matmuls differently
        workdir = str(tmp_path / f"budget{budget}")
        trainer.train_and_evaluate(config, workdir)
        with open(f"{workdir}/metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    full = run(1.0)
    assert not any("txt/description_overflow" in line for line in full)
    del decisions[:]
    packed = run(0.85)
    stepped = decisions[:4]  # the last placement is never stepped
    assert True in stepped and False in stepped, decisions
    assert [line["txt/description_overflow"] for line in packed] == [0.0 if fits else 1.0 for fits in stepped]
    for want, got in zip(full, packed, strict=True):
        for key in (k for k in want if k.startswith("loss/")):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (want["step"], key)
