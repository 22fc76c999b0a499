"""Contrastive and grounding losses: numpy oracles, hand cases, masking, sharding."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grain_jax.losses import LossConfig, contrastive, total_loss
from grain_jax.sharding import create_mesh

jit_total_loss = jax.jit(total_loss, static_argnums=2)
jit_image_caption = jax.jit(contrastive.image_caption_loss)
jit_region_description = jax.jit(contrastive.region_description_loss, static_argnames="negative_groups")

LOG_100 = float(np.log(100.0))


def _random_outputs(rng, batch=4, queries=5, max_boxes=5, dim=8, layers=3):
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    layer_boxes = np.concatenate([rng.uniform(0.2, 0.8, (layers, batch, queries, 2)),
                                  rng.uniform(0.05, 0.5, (layers, batch, queries, 2))], -1).astype(np.float32)
    return {
        "img/embedding": normal(batch, dim), "txt/caption": normal(batch, dim),
        "txt/descriptions": normal(batch, max_boxes, dim), "dec/region_embeddings": normal(batch, queries, dim),
        "dec/boxes": layer_boxes[-1], "dec/layer_boxes": layer_boxes, "logit_scale": np.float32(np.log(1 / 0.07)),
    }


def _random_batch(rng, batch=4, max_boxes=5):
    num_valid = rng.integers(0, max_boxes + 1, size=batch)
    num_valid[0] = max_boxes
    box_mask = np.arange(max_boxes)[None] < num_valid[:, None]
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, max_boxes, 2)),
                            rng.uniform(0.05, 0.5, (batch, max_boxes, 2))], -1).astype(np.float32)
    return {"boxes": boxes * box_mask[..., None], "box_mask": box_mask}


# ----------------------------------------------------------------------------- numpy oracles

def _np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_cross_entropy(logits, label):
    return np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[label]


def _np_image_caption(image, caption, scale):
    logits = scale * _np_normalize(image.astype(np.float64)) @ _np_normalize(caption.astype(np.float64)).T
    n = len(logits)
    return 0.5 * (np.mean([_np_cross_entropy(logits[i], i) for i in range(n)])
                  + np.mean([_np_cross_entropy(logits[:, i], i) for i in range(n)]))


def _np_region_description(regions, descriptions, mask, query_index, target_index, valid, scale, groups):
    """Loops over matched pairs; columns = valid descriptions of the pair's own group."""
    batch, max_boxes = mask.shape
    group_size = batch // groups
    regions, descriptions = _np_normalize(regions.astype(np.float64)), _np_normalize(descriptions.astype(np.float64))
    losses, hits = [], []
    for b in range(batch):
        group = range(b // group_size * group_size, (b // group_size + 1) * group_size)
        columns = [(i, m) for i in group for m in range(max_boxes) if mask[i, m]]
        for k in np.flatnonzero(valid[b]):
            logits = scale * np.array([regions[b, query_index[b, k]] @ descriptions[i, m] for i, m in columns])
            label = columns.index((b, target_index[b, k]))
            losses.append(_np_cross_entropy(logits, label))
            hits.append(np.argmax(logits) == label)
    return np.mean(losses), np.mean(hits)


# ----------------------------------------------------------------------------- contrastive

def test_image_caption_equals_numpy():
    rng = np.random.default_rng(0)
    image, caption = rng.normal(size=(2, 6, 8)).astype(np.float32)
    loss, accuracy = jit_image_caption(image, caption, 10.0)
    np.testing.assert_allclose(loss, _np_image_caption(image, caption, 10.0), rtol=1e-5)
    logits = _np_normalize(image) @ _np_normalize(caption).T
    np.testing.assert_allclose(accuracy, np.mean(np.argmax(logits, 1) == np.arange(6)))


def test_image_caption_example_mask_equals_dropping_the_padding():
    rng = np.random.default_rng(1)
    image, caption = rng.normal(size=(2, 6, 8)).astype(np.float32)
    mask = np.array([True, False, True, True, False, True])
    masked = jit_image_caption(image, caption, 10.0, mask)
    dropped = jit_image_caption(image[mask], caption[mask], 10.0)
    np.testing.assert_allclose(masked, dropped, rtol=1e-6)


def test_aligned_embeddings_and_large_scale_give_zero_loss():
    aligned = np.eye(4, 8, dtype=np.float32) * 3.0  # orthogonal, unnormalised
    loss, accuracy = jit_image_caption(aligned, aligned, 100.0)
    assert float(loss) < 1e-6 and float(accuracy) == 1.0


@pytest.mark.parametrize("groups", [1, 2])
def test_region_description_equals_numpy(groups):
    rng = np.random.default_rng(2 + groups)
    batch, queries, max_boxes, dim = 4, 5, 5, 8
    regions = rng.normal(size=(batch, queries, dim)).astype(np.float32)
    descriptions = rng.normal(size=(batch, max_boxes, dim)).astype(np.float32)
    mask = np.arange(max_boxes)[None] < np.array([5, 2, 0, 3])[:, None]
    query_index = np.stack([rng.permutation(queries) for _ in range(batch)]).astype(np.int32)
    target_index = np.tile(np.arange(max_boxes, dtype=np.int32), (batch, 1))
    valid = mask.copy()
    loss, accuracy = jit_region_description(regions, descriptions, mask, query_index, target_index, valid,
                                                   7.0, negative_groups=groups)
    want_loss, want_accuracy = _np_region_description(regions, descriptions, mask, query_index, target_index,
                                                      valid, 7.0, groups)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy, want_accuracy, rtol=1e-6)


def test_invalid_and_other_group_columns_are_never_targets():
    # One image per group, 2 description slots each; slot 1 of image 0 is padding.
    basis = np.eye(8, dtype=np.float32)
    descriptions = np.stack([basis[[0, 1]], basis[[2, 3]]])
    mask = np.array([[True, False], [True, True]])
    # The region matched to (image 0, target 0) looks most like the padded slot,
    # then like image 1's description 3, least like its own positive.
    regions = np.zeros((2, 1, 8), np.float32)
    regions[0, 0] = 1.0 * basis[0] + 3.0 * basis[1] + 2.0 * basis[3]
    regions[1, 0] = basis[2]
    index = np.zeros((2, 1), np.int32)
    valid = np.array([[True], [False]])
    args = (regions, descriptions, mask, index, index, valid, 100.0)
    _, global_accuracy = jit_region_description(*args, negative_groups=1)
    per_device_loss, per_device_accuracy = jit_region_description(*args, negative_groups=2)
    assert float(global_accuracy) == 0.0  # image 1's description wins; the padded slot never does
    assert float(per_device_accuracy) == 1.0 and float(per_device_loss) < 1e-6  # only column 0 is left


def test_global_description_equals_numpy():
    """Each valid description's cross-entropy over the batch's global embeddings, its own image the label."""
    rng = np.random.default_rng(5)
    image = rng.normal(size=(4, 8)).astype(np.float32)
    descriptions = rng.normal(size=(4, 3, 8)).astype(np.float32)
    mask = np.arange(3)[None] < np.array([3, 1, 0, 2])[:, None]
    loss, accuracy = jax.jit(contrastive.global_description_loss)(image, descriptions, mask, 7.0)
    images, texts = _np_normalize(image.astype(np.float64)), _np_normalize(descriptions.astype(np.float64))
    logits = [(7.0 * images @ texts[b, m], b) for b, m in zip(*np.nonzero(mask))]
    np.testing.assert_allclose(loss, np.mean([_np_cross_entropy(row, b) for row, b in logits]), rtol=1e-5)
    np.testing.assert_allclose(accuracy, np.mean([np.argmax(row) == b for row, b in logits]))


def test_global_description_weight_adds_the_term_and_defaults_to_the_reference():
    rng = np.random.default_rng(6)
    outputs, batch = _random_outputs(rng), _random_batch(rng)
    reference_loss, reference = jit_total_loss(outputs, batch, LossConfig())
    assert "loss/global_description" not in reference
    loss, metrics = jit_total_loss(outputs, batch, LossConfig(global_description=0.5))
    want, _ = contrastive.global_description_loss(outputs["img/embedding"], outputs["txt/descriptions"],
                                                  batch["box_mask"], np.exp(outputs["logit_scale"]))
    np.testing.assert_allclose(metrics["loss/global_description"], want, rtol=1e-6)
    np.testing.assert_allclose(loss, reference_loss + 0.5 * want, rtol=1e-6)
    with pytest.raises(ValueError, match="loss.global_description is computed with contrastive_impl='dense' only"):
        LossConfig(global_description=1.0, contrastive_impl="ring")


def test_negative_groups_must_divide_batch():
    with pytest.raises(ValueError, match="negative_groups=3"):
        contrastive.region_description_loss(np.zeros((4, 1, 2)), np.zeros((4, 1, 2)), np.ones((4, 1), bool),
                                            np.zeros((4, 1), int), np.zeros((4, 1), int), np.ones((4, 1), bool),
                                            1.0, negative_groups=3)


# ----------------------------------------------------------------------------- total loss

def test_perfect_predictions_give_near_zero_loss():
    rng = np.random.default_rng(5)
    batch, queries, max_boxes, dim = 3, 5, 5, 32
    batch_data = _random_batch(rng, batch, max_boxes)
    basis = np.eye(dim, dtype=np.float32)
    descriptions = basis[:batch * max_boxes].reshape(batch, max_boxes, dim)
    permutation = np.stack([rng.permutation(queries) for _ in range(batch)])  # query q predicts target perm[q]
    pred_boxes = np.take_along_axis(batch_data["boxes"], permutation[..., None], 1)
    # queries pointing at padded targets predict some other real box (never matched)
    pred_boxes = np.where(batch_data["box_mask"][np.arange(batch)[:, None], permutation][..., None],
                          pred_boxes, np.float32([0.3, 0.3, 0.1, 0.1]))
    outputs = {
        "img/embedding": basis[-batch:], "txt/caption": basis[-batch:], "txt/descriptions": descriptions,
        "dec/region_embeddings": np.take_along_axis(descriptions, permutation[..., None], 1),
        "dec/boxes": pred_boxes, "logit_scale": np.float32(LOG_100),
    }
    loss, metrics = jit_total_loss(outputs, batch_data, LossConfig())
    assert float(metrics["loss/box_l1"]) < 1e-6
    assert float(metrics["loss/box_giou"]) < 1e-2  # 1 - area / (area + 1e-4) per pair
    assert float(metrics["loss/image_caption"]) < 1e-6 and float(metrics["loss/region_description"]) < 1e-6
    assert float(metrics["acc/image_caption"]) == 1.0 and float(metrics["acc/region_description"]) == 1.0
    assert float(metrics["count/matched"]) == float(metrics["count/boxes"]) == batch_data["box_mask"].sum()
    assert float(loss) < 1e-2


def test_total_is_the_weighted_sum_and_aux_layers_are_rematched():
    rng = np.random.default_rng(6)
    outputs, batch = _random_outputs(rng), _random_batch(rng)
    config = LossConfig(image_caption=0.5, box_l1=2.0, box_giou=3.0, box_factor=1.5, region_description=0.25,
                        aux_loss=True)
    loss, metrics = jit_total_loss(outputs, batch, config)
    expected_keys = {"loss/total", "loss/image_caption", "acc/image_caption", "loss/box_l1", "loss/box_giou",
                     "loss/region_description", "acc/region_description", "count/boxes", "count/matched",
                     "loss/box_l1_aux_0", "loss/box_giou_aux_0", "loss/box_l1_aux_1", "loss/box_giou_aux_1"}
    assert set(metrics) == expected_keys
    box_term = sum(2.0 * metrics[f"loss/box_l1{s}"] + 3.0 * metrics[f"loss/box_giou{s}"]
                   for s in ("", "_aux_0", "_aux_1"))
    want = 0.5 * metrics["loss/image_caption"] + 1.5 * box_term + 0.25 * metrics["loss/region_description"]
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/total"], loss)
    # aux layer 0 on its own equals the main loss computed from that layer's boxes
    _, layer0 = jit_total_loss(dict(outputs, **{"dec/boxes": outputs["dec/layer_boxes"][0]}), batch, LossConfig())
    np.testing.assert_allclose(metrics["loss/box_l1_aux_0"], layer0["loss/box_l1"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/box_giou_aux_0"], layer0["loss/box_giou"], rtol=1e-6)


def test_clip_outputs_and_zero_weights_skip_terms():
    rng = np.random.default_rng(7)
    outputs, batch = _random_outputs(rng), _random_batch(rng)
    clip_outputs = {k: outputs[k] for k in ("img/embedding", "txt/caption", "logit_scale")}
    loss, metrics = jit_total_loss(clip_outputs, batch, LossConfig())
    assert set(metrics) == {"loss/total", "loss/image_caption", "acc/image_caption"}
    np.testing.assert_allclose(loss, _np_image_caption(outputs["img/embedding"], outputs["txt/caption"],
                                                       1 / 0.07), rtol=1e-5)
    # "noloc": box weights 0, region-description still matched; region-description 0 -> no L_rd
    noloc_loss, noloc = jit_total_loss(outputs, batch, LossConfig(box_l1=0.0, box_giou=0.0))
    assert "loss/region_description" in noloc and "count/matched" in noloc
    np.testing.assert_allclose(noloc_loss, noloc["loss/image_caption"] + noloc["loss/region_description"], rtol=1e-6)
    _, no_rd = jit_total_loss(outputs, batch, LossConfig(region_description=0.0))
    assert "loss/region_description" not in no_rd and "loss/box_l1" in no_rd


def test_example_mask_ignores_padding_examples():
    rng = np.random.default_rng(8)
    outputs, batch = _random_outputs(rng), _random_batch(rng)
    padded = dict(batch, mask=np.array([True, True, False, False]))
    loss, metrics = jit_total_loss(outputs, padded, LossConfig())
    halves = jax.tree.map(lambda x: x[:2] if np.ndim(x) and x.shape[0] == 4 else x, (outputs, batch))
    halves[0]["dec/layer_boxes"] = outputs["dec/layer_boxes"][:, :2]
    want_loss, want = jit_total_loss(*halves, LossConfig())
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for key in want:
        np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, err_msg=key)


def test_no_valid_boxes_anywhere_gives_finite_loss_and_gradients():
    rng = np.random.default_rng(9)
    outputs = _random_outputs(rng)
    empty = {"boxes": np.zeros((4, 5, 4), np.float32), "box_mask": np.zeros((4, 5), bool)}
    config = LossConfig(aux_loss=True, description_negatives="per_device", negative_groups=2)

    @jax.jit
    def loss_and_grads(outputs):
        return jax.value_and_grad(lambda o: total_loss(o, empty, config), has_aux=True)(outputs)

    (loss, metrics), grads = loss_and_grads(outputs)
    assert np.isfinite(float(loss))
    assert float(metrics["loss/box_l1"]) == 0.0 and float(metrics["loss/region_description"]) == 0.0
    assert float(metrics["count/boxes"]) == 0.0
    for key, grad in grads.items():
        assert np.all(np.isfinite(grad)), key
    # the zero-box terms contribute no gradient to the decoder outputs
    assert not np.any(grads["dec/boxes"]) and not np.any(grads["dec/region_embeddings"])


def test_sharded_over_8_devices_equals_unsharded():
    rng = np.random.default_rng(10)
    outputs, batch = _random_outputs(rng, batch=8), _random_batch(rng, batch=8)
    config = LossConfig(aux_loss=True, box_factor=1.5)  # global negatives: the cross-device case
    mesh = create_mesh((-1, 1, 1))
    batch_axes = ("data", "fsdp")

    def shard(x, key):
        spec = P() if np.ndim(x) == 0 else P(None, batch_axes) if key == "dec/layer_boxes" else P(batch_axes)
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded_outputs = {k: shard(v, k) for k, v in outputs.items()}
    sharded_batch = {k: shard(v, k) for k, v in batch.items()}
    assert len(sharded_outputs["dec/boxes"].sharding.device_set) == 8
    assert len(sharded_batch["box_mask"].sharding.device_set) == 8
    loss, metrics = jit_total_loss(sharded_outputs, sharded_batch, config)
    want_loss, want = jit_total_loss(outputs, batch, config)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for key in want:
        np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, err_msg=key)


def test_bad_config_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="description_negatives"):
        LossConfig(description_negatives="local")
    with pytest.raises(ValueError, match="negative_groups"):
        LossConfig(negative_groups=0)
    rng = np.random.default_rng(11)
    outputs, batch = _random_outputs(rng), _random_batch(rng)
    with pytest.raises(KeyError, match="box_mask"):
        jit_total_loss(outputs, {"boxes": batch["boxes"]}, LossConfig())  # raised while tracing
    with pytest.raises(ValueError, match="txt/descriptions"):
        jit_total_loss(dict(outputs, **{"txt/descriptions": outputs["txt/descriptions"][:, :3]}), batch, LossConfig())


def test_a_clip_model_is_fed_descriptions_only_for_the_global_description_term():
    from grain_jax.batch import fake_batch
    from grain_jax.inference import objective
    from grain_jax.models import create_model
    model = create_model("clip-tiny", image_size=32)
    batch = fake_batch(4, 32, caption_length=16, description_length=8, seed=0)
    params = jax.jit(model.init)(jax.random.key(0), batch["images"], batch["caption_tokens"])["params"]
    assert objective.text_keys(model) == ("caption_tokens",)
    with_term = LossConfig(global_description=1.0)
    assert objective.text_keys(model, with_term) == ("caption_tokens", "description_tokens")
    loss_fn = jax.jit(objective.forward_loss, static_argnums=(0, 1), static_argnames=("train", "mean", "std"))
    stats = dict(train=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    base_loss, base = loss_fn(model, LossConfig(), params, batch, **stats)
    loss, metrics = loss_fn(model, with_term, params, batch, **stats)
    assert "loss/global_description" not in base
    np.testing.assert_allclose(loss, base_loss + metrics["loss/global_description"], rtol=1e-6)
