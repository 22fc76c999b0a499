"""Schedule values, duration conversion and the weight-decay masks (no model needed)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flax import traverse_util

from grain_jax.train import optimizer, trainer


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        lr=1e-3, lr_start=1e-6, lr_end=1e-5, weight_decay=0.1, wd_rule="default", grad_clip_norm=None,
        adam=dict(b1=0.9, b2=0.98, eps=1e-8),
        total_steps=None, total_epochs=None, total_examples=None,
        warmup_steps=None, warmup_epochs=None, warmup_examples=None))
    config.update(overrides)
    return config


def test_schedule_warmup_then_cosine():
    schedule = optimizer.make_schedule(lr=1e-3, lr_start=1e-6, lr_end=1e-5, total_steps=110, warmup_steps=10)
    np.testing.assert_allclose(schedule(0), 1e-6, rtol=2e-5)
    np.testing.assert_allclose(schedule(5), 1e-6 + (1e-3 - 1e-6) * 0.5, rtol=2e-5)
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=2e-5)
    # Halfway through the cosine: the midpoint of peak and end.
    np.testing.assert_allclose(schedule(60), (1e-3 + 1e-5) / 2, rtol=2e-5)
    cosine_25 = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 25 / 100))
    np.testing.assert_allclose(schedule(35), cosine_25, rtol=2e-5)
    np.testing.assert_allclose(schedule(110), 1e-5, rtol=2e-5)


def test_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="warmup"):
        optimizer.make_schedule(lr=1e-3, lr_start=1e-6, lr_end=1e-5, total_steps=5, warmup_steps=10)


@pytest.mark.parametrize("key,value,expected", [
    ("total_steps", 123, 123),
    ("total_epochs", 2.0, 2 * (1000 // 64)),
    ("total_epochs", 0.5, round(0.5 * (1000 // 64))),
    ("total_examples", 6400, 100),
])
def test_durations_convert_to_steps(key, value, expected):
    steps = optimizer.steps_from_duration(_config(**{key: value}), "total", num_train_examples=1000,
                                          global_batch_size=64)
    assert steps == expected


def test_steps_override_epochs_then_examples():
    sizes = dict(num_train_examples=1000, global_batch_size=64)
    assert optimizer.steps_from_duration(_config(total_steps=10, total_epochs=2.0), "total", **sizes) == 10
    assert optimizer.steps_from_duration(_config(total_examples=640, total_epochs=2.0), "total", **sizes) == 10


def test_durations_errors_name_the_keys():
    sizes = dict(num_train_examples=1000, global_batch_size=64)
    with pytest.raises(ValueError, match="total_steps, total_examples, total_epochs"):
        optimizer.steps_from_duration(_config(), "total", **sizes)
    with pytest.raises(ValueError, match="number of training records"):
        optimizer.steps_from_duration(_config(total_epochs=1.0), "total", num_train_examples=None,
                                      global_batch_size=64)
    assert optimizer.steps_from_duration(_config(), "warmup", default=0, **sizes) == 0


PARAMS = {  # the naming of grain_jax.models (packed qkv projections)
    "image": {"patch_embed": {"kernel": jnp.ones((4, 4, 3, 8)), "bias": jnp.ones(8)},
              "blocks_0": {"norm1": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
                           "attn": {"qkv_kernel": jnp.ones((8, 3, 2, 4)), "qkv_bias": jnp.ones((3, 2, 4)),
                                    "out_bias": jnp.ones(8)}},
              "pos_embed": jnp.ones((1, 5, 8))},
    "decoder": {"query_embed": jnp.ones((6, 8)), "obj_proj": jnp.ones((8, 8)),
                "layers_0": {"norm1": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
                             "self_attn": {"qkv_kernel": jnp.ones((8, 3, 2, 4)), "qkv_bias": jnp.ones((3, 2, 4)),
                                           "out_bias": jnp.ones(8)},
                             "mlp": {"fc1": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}}}},
    "logit_scale": jnp.ones(()),
}


def _decayed(rule):
    mask = jax.tree_util.tree_flatten_with_path(optimizer.weight_decay_mask(PARAMS, rule))[0]
    return {"/".join(k.key for k in path) for path, decays in mask if decays}


def test_default_mask_decays_only_weight_matrices():
    assert _decayed("default") == {
        "image/patch_embed/kernel", "image/blocks_0/attn/qkv_kernel", "image/pos_embed", "decoder/query_embed",
        "decoder/obj_proj", "decoder/layers_0/self_attn/qkv_kernel", "decoder/layers_0/mlp/fc1/kernel"}


def test_reference_mask_follows_the_pytorch_rule():
    # Towers as "default"; the decoder also decays LayerNorm scales and the packed qkv (in_proj) bias.
    assert _decayed("reference") == {
        "image/patch_embed/kernel", "image/blocks_0/attn/qkv_kernel", "image/pos_embed", "decoder/query_embed",
        "decoder/obj_proj", "decoder/layers_0/norm1/scale", "decoder/layers_0/self_attn/qkv_kernel",
        "decoder/layers_0/self_attn/qkv_bias", "decoder/layers_0/mlp/fc1/kernel"}


def test_masked_params_are_not_decayed():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "logit_scale": jnp.ones(())}
    tx = optimizer.make_optimizer(params, optax.constant_schedule(0.1), weight_decay=0.5, wd_rule="default", b1=0.9,
                                  b2=0.98, eps=1e-8)
    zero = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2), "logit_scale": jnp.zeros(())}
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # decay only
    np.testing.assert_array_equal(updates["b"], 0)
    np.testing.assert_array_equal(updates["logit_scale"], 0)


def test_the_trainer_passes_the_config_to_the_optimizer_and_schedule():
    config = _config(weight_decay=0.5, wd_rule="reference", grad_clip_norm=1.0, adam=dict(b1=0.5, b2=0.9, eps=1.0))
    schedule = trainer.schedule_from_config(config, total_steps=110, warmup_steps=10)
    assert [float(schedule(step)) for step in (0, 10, 110)] == pytest.approx([1e-6, 1e-3, 1e-5], rel=2e-5)
    params = {"w": jnp.ones((2, 2)), "decoder": {"norm": {"scale": jnp.ones(2)}}}
    grads = {"w": jnp.full((2, 2), 30.0), "decoder": {"norm": {"scale": jnp.full(2, -40.0)}}}

    def update(tx):
        return tx.update(grads, tx.init(params), params)[0]

    explicit = dict(weight_decay=0.5, wd_rule="reference", b1=0.5, b2=0.9, eps=1.0, grad_clip_norm=1.0)
    got = update(trainer.optimizer_from_config(config, params, schedule))
    jax.tree.map(np.testing.assert_array_equal, got, update(optimizer.make_optimizer(params, schedule, **explicit)))
    # Each setting matters here (eps=1 makes Adam's step depend on the gradient's size, so on the clipping).
    for change in (dict(grad_clip_norm=None), dict(wd_rule="default"), dict(eps=1e-8), dict(weight_decay=0.0)):
        other = update(optimizer.make_optimizer(params, schedule, **{**explicit, **change}))
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(other))), change


def test_unknown_wd_rule_is_rejected():
    with pytest.raises(ValueError, match="wd_rule 'nope'"):
        optimizer.weight_decay_mask(PARAMS, "nope")


def _adam(params, **kwargs):
    return optimizer.make_optimizer(params, optax.constant_schedule(0.1), weight_decay=0.5, wd_rule="default",
                                    b1=0.9, b2=0.98, eps=1e-8, **kwargs)


def test_lr_multipliers_scale_each_groups_update_and_decay():
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), PARAMS)
    plain_tx, scaled_tx = _adam(PARAMS), _adam(PARAMS, lr_multipliers=(("decoder/layers_0", 3.0), ("image", 0.5)))
    plain = traverse_util.flatten_dict(plain_tx.update(grads, plain_tx.init(PARAMS), PARAMS)[0], sep="/")
    scaled = traverse_util.flatten_dict(scaled_tx.update(grads, scaled_tx.init(PARAMS), PARAMS)[0], sep="/")
    assert np.any(plain["decoder/layers_0/mlp/fc1/kernel"] != 0)  # decayed and moved: the factor has work to do
    for path, update in plain.items():
        factor = 3.0 if path.startswith("decoder/layers_0/") else 0.5 if path.startswith("image/") else 1.0
        np.testing.assert_allclose(scaled[path], factor * update, rtol=1e-6, err_msg=path)


def test_without_lr_multipliers_the_optimizer_state_is_plain_adamw():
    # Checkpoints written before the key existed restore: same state tree, with or without clipping.
    assert (jax.tree.structure(_adam(PARAMS).init(PARAMS))
            == jax.tree.structure(optax.adamw(optax.constant_schedule(0.1), mask=optimizer.weight_decay_mask(PARAMS)).init(PARAMS)))
    assert len(_adam(PARAMS, grad_clip_norm=1.0).init(PARAMS)) == 2


def test_lr_multiplier_prefixes_match_whole_path_segments():
    factors = traverse_util.flatten_dict(optimizer.lr_multiplier_labels(
        PARAMS, (("decoder/query_embed", 2.0), ("decoder", 4.0))), sep="/")
    assert factors["decoder/query_embed"] == 2.0  # the first matching rule wins
    assert factors["decoder/obj_proj"] == 4.0 and factors["image/pos_embed"] == 1.0
    with pytest.raises(ValueError, match=r"config.lr_multipliers: prefix 'deco' matches no parameter; top-level "
                                         r"parameters: \['decoder', 'image', 'logit_scale'\]"):
        optimizer.lr_multiplier_labels(PARAMS, (("deco", 2.0),))
    with pytest.raises(ValueError, match="config.lr_multipliers: factor for 'image' must be positive, got 0.0"):
        optimizer.lr_multiplier_labels(PARAMS, (("image", 0),))


def test_the_trainer_passes_lr_multipliers():
    config = _config(lr_multipliers=(("decoder", 2.0),))
    schedule = optax.constant_schedule(0.1)
    got = trainer.optimizer_from_config(config, PARAMS, schedule).init(PARAMS)
    want = _adam(PARAMS, lr_multipliers=(("decoder", 2.0),)).init(PARAMS)
    assert jax.tree.structure(got) == jax.tree.structure(want) != jax.tree.structure(_adam(PARAMS).init(PARAMS))
