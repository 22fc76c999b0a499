"""GradCache accumulation: k micro-batches give the loss and gradients of one step on the full batch, with the
gradient all-reduce once per step."""
import functools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import _train_utils
from grain_jax import batch as batch_lib, sharding
from grain_jax.losses import LossConfig
from grain_jax.train import grad_cache, hlo, state as state_lib, step as step_lib, trainer

BATCH = 16


def test_split_and_join_are_inverse_and_interleave_rows():
    x = np.arange(2 * BATCH * 3).reshape(2, BATCH, 3)  # batch axis 1, like dec/layer_boxes
    parts = grad_cache.split(x, 4, batch_axis=1)
    assert parts.shape == (4, 2, BATCH // 4, 3)
    np.testing.assert_array_equal(parts[1], x[:, 1::4])
    np.testing.assert_array_equal(grad_cache.join(parts, batch_axis=1), x)


@functools.cache
def _setup(model_name, mesh_shape=(2, 2, 1), dtype="float32", scan_layers=False):
    config = _train_utils.runlocal_config("unused", dtype=dtype, global_batch_size=BATCH)
    config.model_name = model_name
    config.model.scan_layers = scan_layers
    if model_name.startswith("grain"):
        config.model.decoder_dropout = 0.0
    mesh = sharding.create_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    rules = sharding.axis_rules()
    model = state_lib.build_model(config)
    schedule = trainer.schedule_from_config(config, total_steps=config.total_steps, warmup_steps=config.warmup_steps)
    state, _, _ = state_lib.create_train_state(
        model, lambda p: trainer.optimizer_from_config(config, p, schedule), mesh, rules, jax.random.PRNGKey(0))
    params = state.params
    data = config.data
    batch = batch_lib.fake_batch(BATCH, data.image_size, data.caption_length, data.description_length,
                                 data.max_boxes, seed=5)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    return model, LossConfig(**config.loss), mesh, rules, params, batch, dict(mean=data.mean, std=data.std)


@functools.cache
def _gradients(model_name, k, mesh_shape=(2, 2, 1), grad_reduce_dtype="compute", scan_layers=False):
    model, loss_config, mesh, rules, params, batch, image_stats = _setup(model_name, mesh_shape,
                                                                         scan_layers=scan_layers)
    fn = jax.jit(step_lib.make_gradient_fn(model, loss_config, k, grad_reduce_dtype=grad_reduce_dtype, **image_stats))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.device_get(fn(params, batch, jax.random.PRNGKey(1)))


@pytest.mark.parametrize("model_name,k,mesh_shape", [
    ("clip-tiny", 2, (2, 2, 1)), ("clip-tiny", 4, (2, 2, 1)), ("grain-tiny", 2, (2, 2, 1)), ("grain-tiny", 4, (2, 2, 1)),
    ("grain-tiny", 2, (2, 2, 2)),  # tensor parallel: the vocab-parallel lookup's shard_map inside the groups'
])
def test_grad_cache_equals_one_full_batch_step(model_name, k, mesh_shape):
    _assert_same_step(_gradients(model_name, k, mesh_shape), _gradients(model_name, 1, mesh_shape), model_name)


def test_grad_cache_with_scanned_layers_equals_one_full_batch_step():
    """scan_layers: the decoder's scan carry starts as zeros that must vary over the groups like its inputs."""
    _assert_same_step(_gradients("grain-tiny", 2, scan_layers=True), _gradients("grain-tiny", 1, scan_layers=True),
                      "grain-tiny")


@pytest.mark.parametrize("model_name,mesh_shape", [("clip-tiny", (2, 2, 1)), ("grain-tiny", (2, 2, 1)),
                                                   ("grain-tiny", (2, 2, 2))])
def test_fp32_gradient_reduction_equals_the_plain_step(model_name, mesh_shape):
    """grad_reduce_dtype="float32" (the model in groups under shard_map) is the same step, fp32 compute."""
    _assert_same_step(_gradients(model_name, 1, mesh_shape, "float32"), _gradients(model_name, 1, mesh_shape),
                      model_name)


def _assert_same_step(got, want, model_name):
    (loss, metrics), grads = got
    (want_loss, want_metrics), want_grads = want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert set(metrics) == set(want_metrics)
    if model_name.startswith("grain"):
        assert {"loss/region_description", "loss/box_giou"} <= set(metrics)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Some leaves have a true gradient of 0 (k_norm biases: softmax is shift-invariant), hence the absolute
    # tolerance relative to the largest gradient entry. 1e-5 of it: the end-of-text token's embedding row sums
    # every caption's O(1) gradient and cancels to 4e-5 of the largest entry, so the summation order alone (micro-
    # batches, groups; the k=1 step on a (1,1,1) and a (2,2,1) mesh already differ by 0.6e-6) moves it by 1.5e-6.
    atol = 1e-5 * max(np.abs(g).max() for g in jax.tree.leaves(want_grads))
    flat, want_flat = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)
    for (path, grad), want_grad in zip(flat, want_flat):
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("model_name", ["clip-tiny", "grain-tiny"])
def test_gradient_all_reduce_runs_once_per_step(model_name):
    """On 8 data-parallel devices, k = 2 compiles to no collective of float data inside any loop: the parameter
    gradients are all-reduced once, after the micro-batches (before, once per micro-batch inside the scan)."""
    model, loss_config, mesh, rules, params, batch, image_stats = _setup(model_name, (8, 1, 1))
    fn = jax.jit(step_lib.make_gradient_fn(model, loss_config, 2, **image_stats))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        collectives = hlo.float_collectives(fn.lower(params, batch, jax.random.PRNGKey(1)).compile().as_text())
    assert [c.op for c in collectives if c.in_loop] == []
    assert "all-reduce" in [c.op for c in collectives]


def test_fsdp_gradient_accumulators_stay_sharded():
    """Over fsdp = 4, each device accumulates a quarter of the gradient: the one all-reduce over ``data`` after
    the micro-batches moves the fsdp-sharded gradients (left unconstrained, the partitioner carried whole
    gradients through the loop and all-reduced all of them at the end)."""
    model, loss_config, mesh, rules, params, batch, image_stats = _setup("grain-tiny", (2, 4, 1))
    fn = jax.jit(step_lib.make_gradient_fn(model, loss_config, 2, **image_stats))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        collectives = hlo.float_collectives(fn.lower(params, batch, jax.random.PRNGKey(1)).compile().as_text())
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    after_loops = sum(c.bytes for c in collectives if c.op == "all-reduce" and not c.in_loop)
    assert param_bytes / 4 <= after_loops < param_bytes / 3


def _float_reduction_dtypes(text: str) -> set[str]:
    """Element types of the all-reduces and reduce-scatters of float data in an HLO module's text."""
    return {dtype for m in hlo.COLLECTIVE.finditer(text) if m.group(2) in ("all-reduce", "reduce-scatter")
            for dtype in re.findall(r"\b(bf16|f16|f32)\[", m.group(1))}


def _partitioned_hlo(lowered, dump_dir) -> str:
    """The HLO right after SPMD partitioning: the all-reduces as a TPU or GPU compiles them (the CPU compiler then
    turns bf16 all-reduces into f32 ones). Compiled with the persistent cache off: a cache hit would dump nothing."""
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        lowered.compile(compiler_options={"xla_dump_to": str(dump_dir), "xla_dump_hlo_pass_re": "spmd-partitioning"})
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()
    (dump,) = dump_dir.glob("*after_spmd-partitioning*.txt")
    return dump.read_text()


@pytest.mark.parametrize("model_name", ["clip-tiny", "grain-tiny"])
def test_grad_reduce_dtype_sets_the_all_reduce_dtype(model_name, tmp_path):
    """bf16 compute on 8 data-parallel devices: the partitioner all-reduces weight gradients in bf16;
    grad_reduce_dtype="float32" all-reduces only fp32 data."""
    model, loss_config, mesh, rules, params, batch, image_stats = _setup(model_name, (8, 1, 1), "bfloat16")
    dtypes = {}
    for reduce_dtype in ("compute", "float32"):
        fn = jax.jit(step_lib.make_gradient_fn(model, loss_config, 1, grad_reduce_dtype=reduce_dtype, **image_stats))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            lowered = fn.lower(params, batch, jax.random.PRNGKey(1))
        dtypes[reduce_dtype] = _float_reduction_dtypes(_partitioned_hlo(lowered, tmp_path / reduce_dtype))
    assert dtypes == {"compute": {"bf16", "f32"}, "float32": {"f32"}}
