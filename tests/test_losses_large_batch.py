"""Chunked and ring contrastive losses: values, accuracies and gradients equal the dense ones (fp32)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grain_jax.losses import LossConfig, grounding, total_loss
from grain_jax.sharding import create_mesh

BATCH, QUERIES, MAX_BOXES, DIM = 16, 5, 5, 8
IMPLS = [("chunked", 4), ("ring", 8)]
MESHES = {"1 device": ((1, 1, 1), 1), "8 devices": ((4, 2, 1), 8)}


def _mesh(name):
    shape, count = MESHES[name]
    return create_mesh(shape, devices=jax.devices()[:count])


def _inputs(seed):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    num_valid = rng.integers(0, MAX_BOXES + 1, size=BATCH)
    num_valid[:2] = (MAX_BOXES, 0)
    mask = np.arange(MAX_BOXES)[None] < num_valid[:, None]
    query_index = np.stack([rng.permutation(QUERIES) for _ in range(BATCH)]).astype(np.int32)
    target_index = np.stack([rng.permutation(MAX_BOXES) for _ in range(BATCH)]).astype(np.int32)
    valid = np.take_along_axis(mask, target_index, axis=1)
    example_mask = rng.uniform(size=BATCH) < 0.8
    example_mask[0] = True
    return dict(image=normal(BATCH, DIM), caption=normal(BATCH, DIM), regions=normal(BATCH, QUERIES, DIM),
                descriptions=normal(BATCH, MAX_BOXES, DIM), mask=mask, query_index=query_index,
                target_index=target_index, valid=valid, example_mask=example_mask, log_scale=np.float32(2.3))


def _caption_loss(config, image, caption, log_scale, example_mask):
    return grounding.image_caption_loss(config, image, caption, jnp.exp(log_scale), example_mask)


def _description_loss(config, groups, regions, descriptions, log_scale, mask, query_index, target_index, valid):
    return grounding.region_description_loss(config, regions, descriptions, mask, query_index, target_index, valid,
                                             jnp.exp(log_scale), negative_groups=groups)


def _value_and_grads(fn, mesh, differentiable, rest):
    """jit(value_and_grad) of ``fn(*differentiable, *rest)`` with every batch-major input sharded over the mesh."""
    batch_sharded = NamedSharding(mesh, P(("data", "fsdp")))
    place = lambda x: jax.device_put(x, batch_sharded if np.ndim(x) else NamedSharding(mesh, P()))
    grad_fn = jax.jit(jax.value_and_grad(lambda d, r: fn(*d, *r), has_aux=True))
    with jax.set_mesh(mesh):
        (loss, accuracy), grads = grad_fn(jax.tree.map(place, differentiable), jax.tree.map(place, rest))
    return jax.device_get((loss, accuracy, grads))


@functools.cache
def _dense(kind, mesh_name, seed, groups=1):
    """The dense loss's (loss, accuracy, grads), computed once per case."""
    x = _inputs(seed)
    if kind == "caption":
        fn = functools.partial(_caption_loss, LossConfig())
        return _value_and_grads(fn, _mesh(mesh_name), *_caption_args(x))
    fn = functools.partial(_description_loss, LossConfig(), groups)
    return _value_and_grads(fn, _mesh(mesh_name), *_description_args(x))


def _caption_args(x):
    return (x["image"], x["caption"], x["log_scale"]), (x["example_mask"],)


def _description_args(x):
    return (x["regions"], x["descriptions"], x["log_scale"]), (x["mask"], x["query_index"], x["target_index"],
                                                               x["valid"])


def _assert_same(got, want):
    (loss, accuracy, grads), (want_loss, want_accuracy, want_grads) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy, want_accuracy, rtol=1e-6)
    for grad, want_grad in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("impl,chunks", IMPLS)
def test_image_caption_equals_dense(impl, chunks, mesh_name):
    config = LossConfig(contrastive_impl=impl, contrastive_chunks=chunks)
    got = _value_and_grads(functools.partial(_caption_loss, config), _mesh(mesh_name), *_caption_args(_inputs(0)))
    want = _dense("caption", mesh_name, 0)
    assert 0 < got[1] < 1  # some hits, some misses: the accuracy comparison means something
    _assert_same(got, want)


@pytest.mark.parametrize("groups", [1, 2, 16])
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("impl,chunks", IMPLS)
def test_region_description_equals_dense(impl, chunks, mesh_name, groups):
    """groups 1 = global negatives; 2 = sub-rings of 4 devices; 16 = one image per group, no hop at all."""
    config = LossConfig(contrastive_impl=impl, contrastive_chunks=chunks)
    got = _value_and_grads(functools.partial(_description_loss, config, groups), _mesh(mesh_name),
                           *_description_args(_inputs(groups)))
    want = _dense("description", mesh_name, groups, groups)
    assert np.abs(want[2][1]).max() > 0  # descriptions get gradient
    _assert_same(got, want)


def test_total_loss_with_ring_equals_dense_on_8_devices():
    """Wired through total_loss (Hungarian matching, masks, per-device negatives) on a 4 x 2 mesh."""
    x = _inputs(7)
    rng = np.random.default_rng(7)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (BATCH, MAX_BOXES, 2)),
                            rng.uniform(0.05, 0.5, (BATCH, MAX_BOXES, 2))], -1).astype(np.float32)
    outputs = {"img/embedding": x["image"], "txt/caption": x["caption"], "txt/descriptions": x["descriptions"],
               "dec/region_embeddings": x["regions"], "dec/boxes": boxes[:, ::-1], "logit_scale": x["log_scale"]}
    batch = {"boxes": boxes * x["mask"][..., None], "box_mask": x["mask"], "mask": x["example_mask"]}
    mesh = _mesh("8 devices")

    def run(**overrides):
        config = LossConfig(description_negatives="per_device", negative_groups=4, **overrides)
        fn = lambda out, b: total_loss(out, b, config)
        return _value_and_grads(fn, mesh, (outputs,), (batch,))

    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = run(contrastive_impl="ring"), run()
    config = LossConfig(description_negatives="per_device", negative_groups=4, contrastive_impl="ring")
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda out, b: total_loss(out, b, config)).lower(outputs, batch).compile().as_text()
    assert "collective-permute" in hlo  # the ring really hops between devices
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert set(metrics) == set(want_metrics)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
    for key in ("img/embedding", "txt/descriptions", "dec/region_embeddings", "logit_scale"):
        np.testing.assert_allclose(grads[0][key], want_grads[0][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_bad_contrastive_settings_name_the_key():
    with pytest.raises(ValueError, match="loss.contrastive_impl"):
        LossConfig(contrastive_impl="sharded")
    with pytest.raises(ValueError, match="loss.contrastive_chunks"):
        LossConfig(contrastive_impl="chunked", contrastive_chunks=0)
    x = _inputs(0)
    with pytest.raises(ValueError, match="loss.contrastive_chunks=3 must be >= 1 and divide"):
        _caption_loss(LossConfig(contrastive_impl="chunked", contrastive_chunks=3), x["image"], x["caption"],
                      x["log_scale"], x["example_mask"])


def test_ring_hops_only_within_a_negative_group():
    from grain_jax.losses import ring
    assert ring._make_ring(("data",), 8, 1).perm == tuple((i, (i + 1) % 8) for i in range(8))
    sub_rings = ring._make_ring(("data",), 8, 2)  # groups of 4 devices
    assert sub_rings.size == 4 and dict(sub_rings.perm) == {0: 1, 1: 2, 2: 3, 3: 0, 4: 5, 5: 6, 6: 7, 7: 4}
    assert ring._make_ring(("data",), 8, 16).size == 1  # every group inside one device: no hop
    assert ring._make_ring(("data",), 8, 3).size == 8  # groups straddle devices: full ring, masks decide
