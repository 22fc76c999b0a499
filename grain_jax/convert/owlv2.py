"""transformers ``Owlv2ForObjectDetection`` checkpoint -> ``grain_jax.models.owlv2.OwlV2`` parameters.

Reads a transformers model directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, e.g.
``google/owlv2-base-patch16-ensemble`` downloaded with ``huggingface-cli download``) without importing
transformers and without running pickled code (see common.load_checkpoint).

transformers keeps q, k and v as three Linear layers; they are stacked into the packed [3W, W] in-projection
our attention layer converts from (towers.attention).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from grain_jax.convert import towers
from grain_jax.convert.common import (
    ConversionError,
    TensorSource,
    check_against_model,
    conv_kernel,
    linear_kernel,
    load_checkpoint,
    matches_any,
    report_unused,
    state_dict_arrays,
)
from grain_jax.models.owlv2 import OwlV2, OwlV2Config

# transformers' CLIPEncoderLayer, with q/k/v fused by `_fuse_qkv` under the made-up name `self_attn.qkv`.
HF_BLOCK = towers.BlockKeys(norm1="layer_norm1", qkv_weight="self_attn.qkv.weight", qkv_bias="self_attn.qkv.bias",
                            out="self_attn.out_proj", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")
# Used by the contrastive OWLv2Model only, not by detection.
UNUSED = ("owlv2.visual_projection.", "owlv2.logit_scale", "box_bias", "owlv2.text_model.embeddings.position_ids",
          "owlv2.vision_model.embeddings.position_ids")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _fuse_qkv(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replaces every ``X.{q,k,v}_proj.{weight,bias}`` triple by ``X.qkv.{weight,bias}`` (q, k, v stacked)."""
    fused = dict(arrays)
    for key in [k for k in arrays if k.endswith(".q_proj.weight")]:
        base = key[:-len(".q_proj.weight")]
        for part in ("weight", "bias"):
            names = [f"{base}.{p}_proj.{part}" for p in "qkv"]
            if not all(n in arrays for n in names):
                raise ConversionError(f"OWLv2 checkpoint: {base} lacks one of q/k/v_proj.{part}")
            fused[f"{base}.qkv.{part}"] = np.concatenate([fused.pop(n) for n in names], 0)
    return fused


def _blocks(src: TensorSource, prefix: str, depth: int, heads: int) -> dict:
    return {f"blocks_{i}": towers.encoder_block(src, f"{prefix}.encoder.layers.{i}", HF_BLOCK, heads)
            for i in range(depth)}


def _mlp3(src: TensorSource, prefix: str) -> dict:
    return {f"dense{j}": towers.dense(src, f"{prefix}.dense{j}") for j in range(3)}


def convert_state_dict(state: Mapping[str, Any], config: OwlV2Config) -> dict:
    """An ``Owlv2ForObjectDetection`` state dict -> our parameter tree (checked against ``OwlV2(config)``)."""
    src = TensorSource(_fuse_qkv(state_dict_arrays(state)), "OWLv2 checkpoint")
    vision, txt = "owlv2.vision_model", "owlv2.text_model"
    params = {
        "vision": {
            "patch_embed": {"kernel": conv_kernel(src.take(f"{vision}.embeddings.patch_embedding.weight"))},
            "cls_token": src.take(f"{vision}.embeddings.class_embedding", (config.vision_width,)).reshape(1, 1, -1),
            "pos_embed": src.take(f"{vision}.embeddings.position_embedding.weight")[None],
            "norm_pre": towers.layer_norm(src, f"{vision}.pre_layernorm"),
            **_blocks(src, vision, config.vision_depth, config.vision_heads),
            "norm": towers.layer_norm(src, f"{vision}.post_layernorm"),
        },
        "text": {
            "token_embedding": {"embedding": src.take(f"{txt}.embeddings.token_embedding.weight")},
            "positional_embedding": src.take(f"{txt}.embeddings.position_embedding.weight"),
            **_blocks(src, txt, config.text_depth, config.text_heads),
            "ln_final": towers.layer_norm(src, f"{txt}.final_layer_norm"),
            "text_projection": linear_kernel(src.take("owlv2.text_projection.weight")),
        },
        "merge_norm": towers.layer_norm(src, "layer_norm"),
        "class_head": {name: towers.dense(src, f"class_head.{name}")
                       for name in ("dense0", "logit_shift", "logit_scale")},
        "box_head": _mlp3(src, "box_head"),
        "objectness_head": _mlp3(src, "objectness_head"),
    }
    report_unused(src, matches_any(UNUSED))
    check_against_model(params, param_shapes(config))
    return params


def param_shapes(config: OwlV2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of ``OwlV2(config)``'s parameters, without allocating them."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    size, length = config.image_size, config.text_length
    abstract = jax.eval_shape(OwlV2(config).init, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                              jnp.zeros((1, 1, length), jnp.int32))
    return {path: tuple(leaf.shape) for path, leaf in flatten_dict(nn.unbox(abstract)["params"]).items()}


def load_transformers_dir(path: str) -> tuple[OwlV2Config, dict]:
    """A transformers OWLv2 model directory -> (config, params as nested numpy dicts)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a transformers model directory: it has no config.json")
    with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("model_type") != "owlv2":
        raise ConversionError(f"{config_path}: model_type is {raw.get('model_type')!r}, expected 'owlv2'")
    weights = next((os.path.join(path, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(path, w))), None)
    if weights is None:
        raise FileNotFoundError(f"{path} holds none of {WEIGHT_FILES} (sharded checkpoints: merge them first)")
    config = OwlV2Config.from_transformers(raw)
    if weights.endswith(".safetensors"):  # numpy reader: the JAX detector runs without PyTorch
        from safetensors.numpy import load_file
        state = load_file(weights)
    else:
        state = load_checkpoint(weights)
    return config, convert_state_dict(state, config)
