"""scan_layers: one nn.scan per tower equals the unrolled blocks, and params convert between the layouts."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from grain_jax import checkpoints, inference, sharding
from grain_jax.batch import fake_batch
from grain_jax.data import transforms
from grain_jax.losses import LossConfig, total_loss
from grain_jax.models import abstract_params, create_model, scan
from grain_jax.train import optimizer, resume

VOCAB = 100
TINY = dict(image_size=32, vocab_size=VOCAB, text_layers=2)  # ViT Mu/8: 3 blocks; decoder: 2 layers


@pytest.fixture(scope="module")
def batch():
    batch = fake_batch(batch_size=2, image_size=32, caption_length=8, description_length=6, vocab_size=VOCAB)
    batch["images"] = np.asarray(transforms.normalize(batch["images"], transforms.IMAGENET_MEAN,
                                                      transforms.IMAGENET_STD))
    return batch


@functools.cache
def _unrolled_params(seed=0):
    """Random fp32 params of the unrolled tiny model (LayerNorm scales near 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        scale = path[-1].key == "scale"
        return jnp.asarray(rng.normal(0.0, 0.1 if scale else 0.05, leaf.shape) + scale, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(create_model("grain-tiny", **TINY))))


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def test_stacked_params_are_the_scanned_models_and_round_trip():
    unrolled = _unrolled_params()
    stacked = scan.stack_layers(unrolled)
    scanned_abstract = abstract_params(create_model("grain-tiny", **TINY, scan_layers=True))
    assert _shapes(stacked) == _shapes(nn.unbox(scanned_abstract))
    assert stacked["image"]["blocks"]["attn"]["qkv_kernel"].shape == (3, 128, 3, 4, 32)
    assert scan.layouts(stacked) == {"image/blocks": ("scanned", 3), "text/blocks": ("scanned", 2),
                                     "decoder/layers": ("scanned", 2)}
    np.testing.assert_array_equal(stacked["decoder"]["layers"]["mlp"]["fc1"]["kernel"][1],
                                  unrolled["decoder"]["layers_1"]["mlp"]["fc1"]["kernel"])
    assert "layers_2" in stacked["decoder"]["bbox_embed"]  # the box MLP's layers are not a stack
    back = scan.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)
    assert scan.stack_layers(stacked) is stacked and scan.unstack_layers(unrolled) is unrolled  # no-ops
    with pytest.raises(ValueError, match=r"image: unrolled layers \['blocks_0', 'blocks_2'\] are not numbered"):
        scan.stack_layers({"image": {"blocks_0": {"w": np.ones(2)}, "blocks_2": {"w": np.ones(2)}}})
    with pytest.raises(ValueError, match="holds both the scanned 'blocks' and unrolled 'blocks_0'"):
        scan.layouts({"image": {"blocks": {"w": np.ones((2, 2))}, "blocks_0": {"w": np.ones(2)}}})


def test_layers_axis_is_logical_and_never_sharded():
    """The stacked axis is named "layers" and replicated; stacking shardings agrees with the scanned model's."""
    mesh = sharding.create_mesh((2, 2, 2))
    rules = sharding.axis_rules()
    boxed = abstract_params(create_model("grain-tiny", **TINY, scan_layers=True))
    assert boxed["image"]["blocks"]["attn"]["qkv_kernel"].names == ("layers", "embed", None, "heads", "kv")
    scanned_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    assert scanned_sh["image"]["blocks"]["attn"]["qkv_kernel"].spec == P(None, "fsdp", None, "tensor", None)
    unrolled = abstract_params(create_model("grain-tiny", **TINY))
    unrolled_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(unrolled), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(unrolled), unrolled_sh)
    stacked = scan.stack_layers(abstract)
    for path, leaf in traverse_util.flatten_dict(stacked, sep="/").items():
        want = traverse_util.flatten_dict(scanned_sh, sep="/")[path]
        assert leaf.sharding.is_equivalent_to(want, len(leaf.shape)), path
    assert jax.tree.map(lambda x: x.sharding, scan.unstack_layers(stacked)) == unrolled_sh


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scanned_outputs_and_loss_gradients_equal_unrolled(batch, remat_policy):
    params = _unrolled_params()
    stacked = scan.stack_layers(params)
    config = LossConfig()
    results = []
    for scan_layers, p in ((False, params), (True, stacked)):
        model = create_model("grain-tiny", **TINY, remat_policy=remat_policy, scan_layers=scan_layers)

        def loss(p, model=model):
            out, _ = model.apply({"params": p}, batch["images"], batch["caption_tokens"], batch["description_tokens"])
            return total_loss(out, batch, config)[0], out

        (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
        results.append((value, out, grads))
    (value, out, grads), (scanned_value, scanned_out, scanned_grads) = results
    np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
    for key in out:
        np.testing.assert_allclose(scanned_out[key], out[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert float(jnp.abs(grads["image"]["blocks_0"]["attn"]["qkv_kernel"]).max()) > 0  # gradients reach the blocks
    flat, scanned_flat = (traverse_util.flatten_dict(g, sep="/") for g in (scan.stack_layers(grads), scanned_grads))
    assert flat.keys() == scanned_flat.keys()
    for path in flat:
        np.testing.assert_allclose(scanned_flat[path], flat[path], rtol=1e-4, atol=1e-6, err_msg=path)


def test_scanned_decoder_dropout_is_per_layer(batch):
    """Each scanned decoder layer draws its own dropout mask (split rngs), and train=False has none."""
    model = create_model("grain-tiny", **TINY, scan_layers=True, decoder_dropout=0.5)
    params = scan.stack_layers(_unrolled_params())
    apply = jax.jit(lambda key, train: model.apply({"params": params}, batch["images"], batch["caption_tokens"],
                                                   train=train, rngs={"dropout": key})[1]["dec/hidden"],
                    static_argnums=1)
    train_a, train_b, evaluation = apply(jax.random.key(0), True), apply(jax.random.key(1), True), \
        apply(jax.random.key(0), False)
    assert not np.allclose(train_a, train_b) and not np.allclose(train_a, evaluation)
    np.testing.assert_array_equal(evaluation, apply(jax.random.key(1), False))


def test_weight_decay_mask_is_the_same_in_both_layouts():
    unrolled = _unrolled_params()
    for rule in optimizer.WD_RULES:
        mask = optimizer.weight_decay_mask(unrolled, rule)
        scanned_mask = optimizer.weight_decay_mask(scan.stack_layers(unrolled), rule)
        as_stacked = scan.stack_layers(jax.tree.map(np.asarray, mask))  # bools -> [depth] bool arrays
        expected = jax.tree.map(lambda m: bool(np.all(m)), as_stacked)
        assert scanned_mask == expected, rule
    assert optimizer.weight_decay_mask(scan.stack_layers(unrolled))["image"]["blocks"]["norm1"]["scale"] is False


def test_unrolled_checkpoint_loads_into_a_scanned_model_and_back(tmp_path):
    params = _unrolled_params()
    stacked = scan.stack_layers(params)
    spec = checkpoints.ModelSpec(model_name="grain-tiny", model_overrides=dict(TINY, scan_layers=True),
                                 image_size=32)
    checkpoints.save_params(str(tmp_path / "unrolled"), params, spec)  # what the converters write
    loaded = inference.load(str(tmp_path / "unrolled"))  # model_config.json asks for the scanned model
    assert loaded.model.scan_layers
    jax.tree.map(np.testing.assert_array_equal, loaded.params, stacked)

    checkpoints.save_params(str(tmp_path / "scanned"), stacked, spec)
    unrolled_model = create_model("grain-tiny", **TINY)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nn.unbox(abstract_params(unrolled_model)))
    jax.tree.map(np.testing.assert_array_equal, checkpoints.restore_params(str(tmp_path / "scanned"), target), params)

    # config.init_from onto a sharded scanned model, keeping the decoder fresh (regexes match either layout here).
    mesh = sharding.create_mesh((2, 2, 2))
    boxed = abstract_params(create_model("grain-tiny", **TINY, scan_layers=True))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.axis_rules())
    fresh = jax.device_put(scan.stack_layers(_unrolled_params(seed=1)), shardings)
    merged = resume.load_init_params(str(tmp_path / "unrolled"), fresh, shardings, dont_load=["decoder/.*"])
    jax.tree.map(np.testing.assert_array_equal, merged["image"], stacked["image"])
    jax.tree.map(np.testing.assert_array_equal, merged["decoder"], fresh["decoder"])
    assert merged["text"]["blocks"]["mlp"]["fc1"]["kernel"].sharding == \
        shardings["text"]["blocks"]["mlp"]["fc1"]["kernel"]


def test_layer_count_mismatch_is_a_clear_error(tmp_path):
    checkpoints.save_params(str(tmp_path), _unrolled_params(), checkpoints.ModelSpec(model_name="grain-tiny"))
    shallow = create_model("grain-tiny", **dict(TINY, text_layers=1), scan_layers=True)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract_params(shallow)))
    with pytest.raises(ValueError, match=r"text/blocks: the model has 1 layers \(scanned\), the checkpoint .* has 2 "
                                         r"\(unrolled\)"):
        checkpoints.restore_params(str(tmp_path), target)
    wider = create_model("grain-tiny", **dict(TINY, decoder_mlp_dim=64), scan_layers=True)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract_params(wider)))
    with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/fc1/kernel has shape \(128, 256\) in the checkpoint, "
                                         r"the model has \(128, 64\)"):
        checkpoints.restore_params(str(tmp_path), target)


def test_scan_layers_is_a_config_key():
    from grain_jax.configs import demo
    from grain_jax.train import state
    config = demo.get_config("runlocal")
    config.lock()
    assert state.build_model(config).scan_layers is False
    config.model.scan_layers = True  # --config.model.scan_layers=True
    assert state.build_model(config).scan_layers is True


def test_resuming_a_workdir_in_the_other_layout_says_why(tmp_path):
    """The optimizer state has the params' layout: a workdir resumes only with its own scan_layers, said first."""
    import grain
    import optax

    from grain_jax.train.state import TrainState

    def state(params):
        tx = optax.adam(1e-3)
        state = TrainState(step=jnp.int32(2), params=params, opt_state=tx.init(params))
        return state, jax.tree.map(lambda x: x.sharding, state)

    unrolled = {"image": {f"blocks_{i}": {"w": jnp.full((4,), float(i))} for i in range(2)}}
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt = resume.Checkpointer(str(tmp_path), keep=1)
    ckpt.save(state(unrolled)[0], jax.random.PRNGKey(0), iterator)
    ckpt.wait()
    with pytest.raises(resume.CheckpointMismatch, match=r"layer layout image/blocks unrolled x2 in the checkpoint, "
                                                        r"image/blocks scanned x2 in this run \(config.model.scan_layers"):
        ckpt.restore(*state(scan.stack_layers(unrolled)), iterator)
    ckpt.close()
