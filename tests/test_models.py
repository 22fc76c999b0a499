"""Model registry, shapes (jax.eval_shape only, nothing materialised) and parameter counts."""
import functools
import math

import jax
import jax.numpy as jnp
import pytest

from grain_jax import models
from grain_jax.models import abstract_params, create_model, init_inputs, list_models, param_counts

EXPECTED_NAMES = {"grain-vit-s16", "grain-vit-b16", "grain-vit-l14", "clip-vit-s16", "clip-vit-b16", "clip-vit-l14",
                  "grain-tiny", "clip-tiny", "clip-vit-b16-openai", "clip-tiny-openai"}


def test_registry_names_and_top_level_wrapper():
    import grain_jax
    assert set(list_models()) == EXPECTED_NAMES
    assert grain_jax.list_models() == list_models()
    assert grain_jax.create_model("grain-tiny", num_queries=3).num_queries == 3


def test_create_model_rejects_unknown_name_and_override():
    with pytest.raises(ValueError, match="unknown model 'grain-vit-b17'"):
        create_model("grain-vit-b17")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['num_querys'\]"):
        create_model("grain-tiny", num_querys=3)
    with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
        param_counts(create_model("grain-tiny", vit_variant="X/16"))
    with pytest.raises(ValueError, match="unknown remat_policy 'sometimes'"):
        param_counts(create_model("grain-tiny", remat_policy="sometimes"))
    with pytest.raises(ValueError, match="unknown remat_policy 'save_only_these_names'"):  # builds a policy, is none
        param_counts(create_model("grain-tiny", remat_policy="save_only_these_names"))


def test_dtype_strings_are_parsed():
    model = create_model("grain-tiny", dtype="bfloat16", param_dtype="float32")
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32


BATCH, NUM_BOXES, CAPTION_LEN, DESC_LEN = 2, 3, 9, 7


@functools.cache
def _abstract_forward(name):
    """(model, out, aux, variables) of ``init_with_output`` as shapes: one trace, no allocation."""
    return _abstract_forward_of(create_model(name))


def _abstract_forward_of(model):
    inputs = init_inputs(model, BATCH, CAPTION_LEN, DESC_LEN, max_boxes=NUM_BOXES)
    (out, aux), variables = jax.eval_shape(lambda key, *x: model.init_with_output({"params": key}, *x),
                                           jax.random.key(0), *inputs)
    return model, out, aux, variables


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_output_shapes_of_every_registered_model(name):
    model, out, aux, variables = _abstract_forward(name)
    e, q = model.embed_dim, model.num_queries
    expected = {"img/embedding": (BATCH, e), "txt/caption": (BATCH, e), "txt/descriptions": (BATCH, NUM_BOXES, e),
                "logit_scale": ()}
    if model.mode == "grain":
        expected.update({"dec/region_embeddings": (BATCH, q, e), "dec/boxes": (BATCH, q, 4),
                         "dec/layer_boxes": (model.decoder_layers, BATCH, q, 4)})
    assert {k: v.shape for k, v in out.items()} == expected
    assert all(v.dtype == jnp.float32 for v in out.values())
    patches = (model.image_size // int(model.vit_variant.split("/")[1])) ** 2
    vit_width = models.vit.decode_variant(model.vit_variant)["width"]
    assert aux["img/tokens"].shape == (BATCH, 1 + patches, vit_width)
    assert aux["txt/caption_features"].shape == (BATCH, CAPTION_LEN, model.text_width)
    top = set(variables["params"])
    assert top == ({"image", "text", "decoder", "logit_scale"} if model.mode == "grain"
                   else {"image", "text", "image_projection", "logit_scale"})


@pytest.mark.parametrize("name", ["grain-tiny", "clip-tiny"])
def test_encode_methods_shapes(name):
    model, _, _, variables = _abstract_forward(name)
    assert param_counts(model) == {k: _count(v) for k, v in variables["params"].items()}
    images, captions, _ = init_inputs(model, BATCH, CAPTION_LEN)
    encoded = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode_image"), variables, images)
    extra = {"dec/boxes": (BATCH, model.num_queries, 4), "dec/region_embeddings": (BATCH, model.num_queries, 128)}
    assert {k: v.shape for k, v in encoded.items()} == {"img/embedding": (BATCH, 128),
                                                        **(extra if model.mode == "grain" else {})}
    text = jax.eval_shape(lambda v, t: model.apply(v, t, method="encode_text"), variables, captions)
    assert text.shape == (BATCH, 128)
    descriptions = jax.ShapeDtypeStruct((BATCH, NUM_BOXES, DESC_LEN), jnp.int32)
    assert jax.eval_shape(lambda v, t: model.apply(v, t, method="encode_text"), variables,
                          descriptions).shape == (BATCH, NUM_BOXES, 128)


def test_paper_configuration_parameter_counts():
    # Used parameters of the reference (its model definition): B/16 image tower 85.8 M
    # (without the unused image_projection), text tower 63.4 M (incl. 25.3 M token embedding and
    # text_projection), decoder 26.7 M (without the dead 22048-way class head, pos_embed, temporal_embed).
    counts = {k: _count(v) for k, v in _abstract_forward("grain-vit-b16")[3]["params"].items()}
    assert counts["image"] == pytest.approx(85.8e6, rel=5e-3)
    assert counts["text"] == pytest.approx(63.4e6, rel=5e-3)
    assert counts["decoder"] == pytest.approx(26.7e6, rel=5e-3)
    assert counts["logit_scale"] == 1
    # Exact per-block arithmetic for B/16: qkv 768*2304+2304, qk-norm 4*64, proj 768^2+768, 2 LNs, MLP 2*768*3072+3072+768.
    block = 768 * 2304 + 2304 + 4 * 64 + 768 * 768 + 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768
    stem = 16 * 16 * 3 * 768 + 768 + 768 + 197 * 768
    assert counts["image"] == stem + 12 * block + 2 * 768
    clip = {k: _count(v) for k, v in _abstract_forward("clip-vit-b16")[3]["params"].items()}
    assert clip["image_projection"] == 768 * 512 and clip["image"] == counts["image"]


def test_vit_options_for_openai_clip_change_the_parameter_tree():
    ref = _abstract_forward("clip-tiny")[3]["params"]["image"]
    openai = _abstract_forward("clip-tiny-openai")[3]["params"]["image"]
    assert "q_norm" in ref["blocks_0"]["attn"] and "q_norm" not in openai["blocks_0"]["attn"]
    assert "norm_pre" in openai and "norm_pre" not in ref
    assert "bias" in ref["patch_embed"] and "bias" not in openai["patch_embed"]


def test_overrides_reach_the_modules():
    model = create_model("grain-tiny", num_queries=7, decoder_layers=3, decoder_mlp_dim=64, decoder_heads=2,
                         embed_dim=32, image_size=48, vit_variant="Mu/16")
    params = abstract_params(model)
    assert params["decoder"]["query_embed"].value.shape == (8, model.decoder_width)
    assert {k for k in params["decoder"] if k.startswith("layers_")} == {"layers_0", "layers_1", "layers_2"}
    assert params["decoder"]["layers_0"]["mlp"]["fc1"]["kernel"].value.shape == (model.decoder_width, 64)
    assert params["decoder"]["obj_proj"].value.shape == (model.decoder_width, 32)
    assert params["image"]["pos_embed"].value.shape == (1, 1 + 3 * 3, 128)
    assert params["decoder"]["layers_0"]["self_attn"]["qkv_kernel"].value.shape == (128, 3, 2, 64)


def test_param_dtype_reaches_every_parameter_and_bad_images_are_named():
    model = create_model("grain-tiny", param_dtype="bfloat16", dtype="bfloat16")
    _, _, _, variables = _abstract_forward_of(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.bfloat16)}
    wrong = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"images must be \[B, 64, 64, 3\] \(model image_size=64\)"):
        jax.eval_shape(lambda v, x: model.apply(v, x, method="encode_image"), variables, wrong)
