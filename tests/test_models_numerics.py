"""Model numerics on a tiny GRAIN model: a float64 numpy oracle written from the reference's PyTorch
semantics (weights taken through the PyTorch layouts documented in grain_jax/models/layers.py), text
masking and pooling, dropout, bf16, remat and sharding."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.special import erf

from grain_jax import sharding
from grain_jax.batch import fake_batch
from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from grain_jax.data import transforms
from grain_jax.losses import LossConfig, total_loss
from grain_jax.models import create_model

VOCAB = 512
TINY = dict(image_size=32, vocab_size=VOCAB, text_layers=2)


# ----------------------------------------------------------------------------- numpy oracle (PyTorch semantics)
def np_layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def quick_gelu(x):
    return x / (1 + np.exp(-1.702 * x))


def relu(x):
    return np.maximum(x, 0)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def torch_attention_weights(p):
    """Our attention params -> PyTorch (in_proj_weight [3W, W], in_proj_bias [3W], out_proj.weight [W, W], bias)."""
    width = p["qkv_kernel"].shape[0]
    return (p["qkv_kernel"].reshape(width, 3 * width).T, p["qkv_bias"].reshape(3 * width),
            p["out_kernel"].reshape(width, width).T, p["out_bias"])


def np_attention(xq, xk, xv, p, heads, qk_norm=False, causal=False):
    in_w, in_b, out_w, out_b = torch_attention_weights(p)
    width = xq.shape[-1]
    head_dim = width // heads

    def split(x, i):  # [B, L, W] -> [B, H, L, Dh]
        y = x @ in_w[i * width:(i + 1) * width].T + in_b[i * width:(i + 1) * width]
        return y.reshape(*y.shape[:2], heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = split(xq, 0), split(xk, 1), split(xv, 2)
    if qk_norm:
        q, k = np_layer_norm(q, p["q_norm"], 1e-6), np_layer_norm(k, p["k_norm"], 1e-6)
    scores = q @ k.swapaxes(-1, -2) * head_dim ** -0.5
    if causal:
        scores = scores + np.triu(np.full(scores.shape[-2:], -np.inf), 1)
    out = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(xq.shape)
    return out @ out_w.T + out_b


def np_mlp(x, p, act):
    return act(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def np_block(x, p, heads, eps, act, qk_norm=False, causal=False):
    y = np_layer_norm(x, p["norm1"], eps)
    x = x + np_attention(y, y, y, p["attn"], heads, qk_norm, causal)
    return x + np_mlp(np_layer_norm(x, p["norm2"], eps), p["mlp"], act)


def np_vit(images, p, heads, patch, eps=1e-6, act=gelu, qk_norm=True, pre_norm=False):
    """timm / open_clip ViT forward on NCHW-converted images, conv weight in PyTorch layout [W, 3, p, p]."""
    b, size = images.shape[:2]
    n = size // patch
    conv_w = p["patch_embed"]["kernel"].transpose(3, 2, 0, 1)
    nchw = images.transpose(0, 3, 1, 2).reshape(b, 3, n, patch, n, patch)
    x = np.einsum("bchiwj,ocij->bohw", nchw, conv_w)
    if "bias" in p["patch_embed"]:
        x = x + p["patch_embed"]["bias"][:, None, None]
    x = x.reshape(b, x.shape[1], n * n).transpose(0, 2, 1)  # flatten(2).transpose(1, 2)
    x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, x.shape[-1])), x], 1) + p["pos_embed"]
    if pre_norm:
        x = np_layer_norm(x, p["norm_pre"], eps)
    depth = len([k for k in p if k.startswith("blocks_")])
    for i in range(depth):
        x = np_block(x, p[f"blocks_{i}"], heads, eps, act, qk_norm=qk_norm)
    return np_layer_norm(x, p["norm"], eps)


def np_text(tokens, p, heads):
    x = p["token_embedding"]["embedding"][tokens] + p["positional_embedding"][:tokens.shape[1]]
    depth = len([k for k in p if k.startswith("blocks_")])
    for i in range(depth):
        x = np_block(x, p[f"blocks_{i}"], heads, 1e-5, quick_gelu, causal=True)
    x = np_layer_norm(x, p["ln_final"], 1e-5)
    return x[np.arange(len(tokens)), tokens.argmax(-1)] @ p["text_projection"]


def np_decoder(vision_tokens, p, heads, num_queries):
    """model/tfm.py: Cross_Attention(normalize_before=True, return_intermediate_dec=True) + ObjDecoder."""
    memory = np_layer_norm(vision_tokens @ p["input_proj"]["kernel"], p["pre_norm"], 1e-5)
    pos = p["query_embed"][None]
    tgt = np.zeros((len(vision_tokens),) + p["query_embed"].shape)
    hidden = []
    for i in range(len([k for k in p if k.startswith("layers_")])):
        lp = p[f"layers_{i}"]
        t2 = np_layer_norm(tgt, lp["norm1"], 1e-5)
        tgt = tgt + np_attention(t2 + pos, t2 + pos, t2, lp["self_attn"], heads)
        t2 = np_layer_norm(tgt, lp["norm2"], 1e-5)
        tgt = tgt + np_attention(t2 + pos, memory, memory, lp["cross_attn"], heads)
        tgt = tgt + np_mlp(np_layer_norm(tgt, lp["norm3"], 1e-5), lp["mlp"], relu)
        hidden.append(np_layer_norm(tgt, p["decoder_norm"], 1e-5))
    hs = np.stack(hidden)
    box = hs[:, :, :num_queries]
    for j in range(3):
        layer = p["bbox_embed"][f"layers_{j}"]
        box = box @ layer["kernel"] + layer["bias"]
        box = relu(box) if j < 2 else 1 / (1 + np.exp(-box))
    return {"dec/layer_boxes": box, "dec/boxes": box[-1],
            "dec/region_embeddings": hs[-1, :, :num_queries] @ p["obj_proj"],
            "img/embedding": hs[-1, :, num_queries] @ p["img_proj"]}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def batch():
    batch = fake_batch(batch_size=4, image_size=32, caption_length=10, description_length=6, vocab_size=VOCAB)
    batch["images"] = np.asarray(transforms.normalize(batch["images"], IMAGENET_MEAN, IMAGENET_STD))  # model input
    return batch


def _random_variables(model, batch, seed=0):
    """Random variables of the right tree, from shapes only (no init compile); LayerNorm scales near 1 and
    non-zero biases make the oracle comparison stricter than the real init would."""
    abstract = jax.eval_shape(lambda key: model.init({"params": key}, batch["images"], batch["caption_tokens"],
                                                     batch["description_tokens"]), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        value = rng.normal(0.0, 0.1 if path[-1].key == "scale" else 0.05, leaf.shape)
        return jnp.asarray(value + (path[-1].key == "scale"), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract)), abstract


def _forward(model):
    @functools.partial(jax.jit, static_argnames="train")
    def forward(variables, batch, key, train=False):
        out, _ = model.apply(variables, batch["images"], batch["caption_tokens"], batch["description_tokens"],
                             train=train, rngs={"dropout": key})
        return out
    return forward


@pytest.fixture(scope="module")
def grain(batch):
    model = create_model("grain-tiny", **TINY)
    variables, abstract = _random_variables(model, batch)
    forward = _forward(model)
    return model, variables, abstract, forward, forward(variables, batch, jax.random.key(0))


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ----------------------------------------------------------------------------- tests
def test_grain_forward_matches_reference_oracle(grain, batch):
    model, variables, _, _, out = grain
    p = _np(variables["params"])
    tokens = np_vit(np.asarray(batch["images"], np.float64), p["image"], heads=4, patch=8)
    expected = np_decoder(tokens, p["decoder"], heads=model.decoder_heads, num_queries=model.num_queries)
    expected["txt/caption"] = np_text(batch["caption_tokens"], p["text"], model.text_heads)
    desc = batch["description_tokens"]
    expected["txt/descriptions"] = np_text(desc.reshape(-1, desc.shape[-1]), p["text"],
                                           model.text_heads).reshape(*desc.shape[:2], -1)
    for key, value in expected.items():
        np.testing.assert_allclose(out[key], value, rtol=2e-4, atol=2e-5, err_msg=key)
    assert float(out["logit_scale"]) == float(variables["params"]["logit_scale"])
    boxes = np.asarray(out["dec/boxes"])
    assert boxes.min() > 0 and boxes.max() < 1


def test_initialisation_follows_the_reference(batch):
    model = create_model("grain-tiny", **TINY)
    params = nn.unbox(jax.jit(lambda key: model.init({"params": key}, batch["images"], batch["caption_tokens"],
                                                      batch["description_tokens"]))(jax.random.key(0)))["params"]
    params = _np(params)
    assert params["logit_scale"] == pytest.approx(np.log(1 / 0.07))
    dec, text, image = params["decoder"], params["text"], params["image"]
    width = model.decoder_width
    assert dec["query_embed"].std() == pytest.approx(1.0, rel=0.15)
    assert dec["obj_proj"].std() == pytest.approx(width ** -0.5, rel=0.1)
    # Xavier-uniform on the packed [3D, D] in-projection: bound sqrt(6 / (D + 3D)); biases zero.
    qkv = dec["layers_0"]["self_attn"]["qkv_kernel"]
    bound = np.sqrt(6 / (4 * width))
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.95 * bound
    assert not dec["layers_0"]["self_attn"]["qkv_bias"].any()
    # CLIP text init: in-proj N(0, W^-0.5), c_proj N(0, W^-0.5 (2 depth)^-0.5), token embedding N(0, 0.02).
    tw, depth = model.text_width, model.text_layers
    assert text["blocks_0"]["attn"]["qkv_kernel"].std() == pytest.approx(tw ** -0.5, rel=0.1)
    assert text["blocks_0"]["mlp"]["fc2"]["kernel"].std() == pytest.approx(tw ** -0.5 * (2 * depth) ** -0.5, rel=0.1)
    assert text["token_embedding"]["embedding"].std() == pytest.approx(0.02, rel=0.05)
    # Reference ViT blocks keep PyTorch's default Linear init U(+-1/sqrt(fan_in)), biases included.
    vit_bias = image["blocks_0"]["attn"]["qkv_bias"]
    assert np.abs(vit_bias).max() <= 128 ** -0.5 and vit_bias.std() == pytest.approx(128 ** -0.5 / np.sqrt(3), rel=0.15)
    assert (image["norm"]["scale"] == 1).all() and not image["norm"]["bias"].any()


def test_openai_clip_vit_options_match_open_clip_oracle(batch):
    model = create_model("clip-tiny-openai", **TINY)
    variables, _ = _random_variables(model, batch, seed=1)
    out = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))(variables, batch["images"])
    p = _np(variables["params"])
    tokens = np_vit(np.asarray(batch["images"], np.float64), p["image"], heads=4, patch=8, eps=1e-5,
                    act=quick_gelu, qk_norm=False, pre_norm=True)
    np.testing.assert_allclose(out["img/embedding"], tokens[:, 0] @ p["image_projection"], rtol=2e-4, atol=2e-5)


def test_text_tower_pooling_causality_and_padding(grain):
    model, variables, _, _, _ = grain
    text = jax.jit(lambda v, t: model.apply(v, t, method=lambda m, t: m.text(t)))
    rng = np.random.default_rng(1)
    tokens = np.zeros((3, 16), np.int32)
    tokens[:, 0] = VOCAB - 2  # SOT
    tokens[:, 1:9] = rng.integers(1, VOCAB - 2, size=(3, 8))
    tokens[:, 9] = VOCAB - 1  # EOT, the largest id
    embedding, features = map(np.asarray, text(variables, tokens))

    # Pooling: the EOT position's final-LN feature times text_projection.
    projection = np.asarray(variables["params"]["text"]["text_projection"])
    np.testing.assert_allclose(embedding, features[:, 9] @ projection, rtol=1e-5, atol=1e-6)

    # Causal mask: changing token 5 leaves positions 0..4 bit-identical and changes positions 5..
    perturbed = tokens.copy()
    perturbed[:, 5] = (perturbed[:, 5] + 7) % (VOCAB - 2) + 1
    _, features2 = map(np.asarray, text(variables, perturbed))
    np.testing.assert_array_equal(features2[:, :5], features[:, :5])
    assert np.abs(features2[:, 5:] - features[:, 5:]).min(axis=-1).max() > 0

    # Length-agnostic: the same texts padded to 77 give the same embeddings.
    padded = np.zeros((3, 77), np.int32)
    padded[:, :16] = tokens
    np.testing.assert_allclose(np.asarray(text(variables, padded)[0]), embedding, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="text length 78 exceeds context_length 77"):
        text(variables, np.zeros((1, 78), np.int32))


def test_dropout_only_in_training(grain, batch):
    _, variables, _, forward, out = grain
    again = forward(variables, batch, jax.random.key(5))
    for key in out:  # eval ignores the rng
        np.testing.assert_array_equal(again[key], out[key], err_msg=key)
    train_a = forward(variables, batch, jax.random.key(1), train=True)
    train_b = forward(variables, batch, jax.random.key(2), train=True)
    assert not np.allclose(train_a["img/embedding"], out["img/embedding"], atol=1e-4)
    assert not np.allclose(train_a["dec/boxes"], train_b["dec/boxes"], atol=1e-5)
    # The towers have no dropout (as in the reference); only the decoder does.
    np.testing.assert_array_equal(train_a["txt/caption"], out["txt/caption"])


def test_bfloat16_compute_keeps_float32_outputs(grain, batch):
    _, variables, _, _, out = grain
    bf16 = create_model("grain-tiny", **TINY, dtype="bfloat16")
    out16 = _forward(bf16)(variables, batch, jax.random.key(0))
    assert set(out16) == set(out)
    for key, value in out16.items():
        assert value.dtype == jnp.float32, key
    for key in ("img/embedding", "txt/caption", "txt/descriptions", "dec/region_embeddings"):
        a = np.asarray(out[key]).reshape(-1, out[key].shape[-1])
        b = np.asarray(out16[key]).reshape(-1, out[key].shape[-1])
        cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cosine.min() > 0.98, key
    np.testing.assert_allclose(out16["dec/boxes"], out["dec/boxes"], atol=3e-2)


def _count_checkpoints(jaxpr) -> int:
    """Number of jax.checkpoint (remat) regions in a jaxpr, nested sub-jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("checkpoint", "remat2")  # the primitive's name differs across jax versions
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_checkpoints(inner)
    return count


def test_remat_policy_wraps_every_block_in_a_checkpoint(grain, batch):
    _, variables, abstract, _, _ = grain
    for policy, expected in (("none", 0), ("full", 9), ("dots_saveable", 9)):
        remat = create_model("grain-tiny", **TINY, remat_policy=policy)
        jaxpr = jax.make_jaxpr(lambda v, m=remat: m.apply(v, batch["images"], batch["caption_tokens"],
                                                          batch["description_tokens"]))(variables)
        # 3 ViT blocks + 2 text blocks x (captions, descriptions) + 2 decoder layers.
        assert _count_checkpoints(jaxpr.jaxpr) == expected, policy
        same_tree = jax.eval_shape(lambda key, m=remat: m.init({"params": key}, batch["images"],
                                                               batch["caption_tokens"], batch["description_tokens"]),
                                   jax.random.key(0))
        assert jax.tree.structure(same_tree) == jax.tree.structure(abstract)


@pytest.mark.parametrize("policy, kept", [("save_qkv_proj", {"qkv_proj"}),
                                          ("save_dot_except_mlp", {"qkv_proj", "out_proj"})])
def test_named_remat_policies_keep_their_projections_and_give_the_same_gradients(grain, batch, policy, kept, capsys):
    _, variables, _, _, _ = grain
    config = LossConfig()

    def loss_fn(model):
        def loss(v):
            out, _ = model.apply(v, batch["images"], batch["caption_tokens"], batch["description_tokens"])
            return total_loss(out, batch, config)[0]
        return loss

    remat = loss_fn(create_model("grain-tiny", **TINY, remat_policy=policy))
    jax.ad_checkpoint.print_saved_residuals(remat, variables)
    assert set(re.findall(r"named '(\w+)'", capsys.readouterr().out)) == kept
    value, grads = jax.jit(jax.value_and_grad(loss_fn(create_model("grain-tiny", **TINY))))(variables)
    remat_value, remat_grads = jax.jit(jax.value_and_grad(remat))(variables)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    assert float(jnp.abs(grads["params"]["image"]["blocks_0"]["attn"]["qkv_kernel"]).max()) > 0
    for path, g in traverse_util.flatten_dict(grads, sep="/").items():
        np.testing.assert_allclose(traverse_util.flatten_dict(remat_grads, sep="/")[path], g, rtol=1e-5, atol=1e-7,
                                   err_msg=path)


def test_sharded_apply_equals_unsharded(grain, batch):
    model, variables, abstract, _, out = grain
    mesh = sharding.create_mesh((2, 2, 2))
    rules = sharding.axis_rules()
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    qkv = param_shardings["params"]["image"]["blocks_0"]["attn"]["qkv_kernel"]
    assert qkv.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded_vars = jax.device_put(variables, param_shardings)
        sharded_batch = jax.device_put(dict(batch), batch_sharding)
        sharded_out = _forward(model)(sharded_vars, sharded_batch, jax.random.key(0))
    assert len(sharded_out["img/embedding"].sharding.device_set) == 8
    for key in out:
        np.testing.assert_allclose(sharded_out[key], out[key], rtol=1e-4, atol=1e-5, err_msg=key)
