"""PyTorch state-dict names -> grain_jax parameter trees, per building block.

Each function takes a ``TensorSource`` and a key prefix and returns the nested dict of
numpy arrays for one of our modules (names and layouts as in grain_jax/models/layers.py:
Dense ``kernel [in, out]``, attention ``qkv_kernel [W, 3, H, Dh]``, ``qkv_bias [3, H, Dh]``,
``out_kernel [H, Dh, W]``, LayerNorm ``scale``/``bias``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from grain_jax.convert.common import (
    ConversionError,
    TensorSource,
    conv_kernel,
    linear_kernel,
)


@dataclasses.dataclass(frozen=True)
class BlockKeys:
    """Where a pre-LN transformer block keeps its tensors (relative to the block prefix)."""
    norm1: str
    qkv_weight: str
    qkv_bias: str
    out: str
    norm2: str
    fc1: str
    fc2: str
    q_norm: str | None = None
    k_norm: str | None = None


# timm VisionTransformer blocks (the reference image tower, qk_norm=True).
TIMM_BLOCK = BlockKeys(norm1="norm1", qkv_weight="attn.qkv.weight", qkv_bias="attn.qkv.bias", out="attn.proj",
                       norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2", q_norm="attn.q_norm", k_norm="attn.k_norm")
# OpenAI CLIP ResidualAttentionBlock (both towers of OpenAI / open_clip, the reference text tower).
OPENAI_BLOCK = BlockKeys(norm1="ln_1", qkv_weight="attn.in_proj_weight", qkv_bias="attn.in_proj_bias",
                         out="attn.out_proj", norm2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")


def layer_norm(src: TensorSource, prefix: str, width: int | None = None) -> dict:
    shape = None if width is None else (width,)
    return {"scale": src.take(f"{prefix}.weight", shape), "bias": src.take(f"{prefix}.bias", shape)}


def dense(src: TensorSource, prefix: str, bias: bool = True) -> dict:
    params = {"kernel": linear_kernel(src.take(f"{prefix}.weight"))}
    if bias:
        params["bias"] = src.take(f"{prefix}.bias")
    return params


def attention(src: TensorSource, qkv_weight: str, qkv_bias: str, out: str, num_heads: int) -> dict:
    """Packed q/k/v in-projection ([3W, W] weight, [3W] bias) + out-projection -> our MultiHeadAttention."""
    weight = src.take(qkv_weight)
    width = weight.shape[1]
    if weight.shape != (3 * width, width) or width % num_heads:
        raise ConversionError(f"{src.name}: {qkv_weight!r} has shape {weight.shape}, expected [3W, W] with W "
                         f"divisible by {num_heads} heads")
    head_dim = width // num_heads
    # [3W, W] -> [W, 3W]; output index s*W + h*Dh + d (PyTorch splits q/k/v, then heads) -> [W, 3, H, Dh].
    return {
        "qkv_kernel": linear_kernel(weight).reshape(width, 3, num_heads, head_dim),
        "qkv_bias": src.take(qkv_bias, (3 * width,)).reshape(3, num_heads, head_dim),
        "out_kernel": linear_kernel(src.take(f"{out}.weight", (width, width))).reshape(num_heads, head_dim, width),
        "out_bias": src.take(f"{out}.bias", (width,)),
    }


def encoder_block(src: TensorSource, prefix: str, keys: BlockKeys, num_heads: int) -> dict:
    """One pre-LN block -> our layers.EncoderBlock (norm1, attn, norm2, mlp.fc1/fc2)."""
    attn = attention(src, f"{prefix}.{keys.qkv_weight}", f"{prefix}.{keys.qkv_bias}", f"{prefix}.{keys.out}", num_heads)
    if keys.q_norm is not None:
        # Per-head LayerNorm over head_dim: the same [Dh] scale/bias for every head.
        head_dim = attn["qkv_kernel"].shape[-1]
        attn["q_norm"] = layer_norm(src, f"{prefix}.{keys.q_norm}", head_dim)
        attn["k_norm"] = layer_norm(src, f"{prefix}.{keys.k_norm}", head_dim)
    return {
        "norm1": layer_norm(src, f"{prefix}.{keys.norm1}"),
        "attn": attn,
        "norm2": layer_norm(src, f"{prefix}.{keys.norm2}"),
        "mlp": {"fc1": dense(src, f"{prefix}.{keys.fc1}"), "fc2": dense(src, f"{prefix}.{keys.fc2}")},
    }


def _blocks(src: TensorSource, prefix: str, depth: int, keys: BlockKeys, num_heads: int) -> dict:
    return {f"blocks_{i}": encoder_block(src, f"{prefix}.{i}", keys, num_heads) for i in range(depth)}


def timm_vit(src: TensorSource, prefix: str, *, depth: int, num_heads: int) -> dict:
    """timm VisionTransformer (class token, no pre-norm, qk-norm blocks, final ``norm``) -> our ViT."""
    return {
        "patch_embed": {"kernel": conv_kernel(src.take(f"{prefix}patch_embed.proj.weight")),
                        "bias": src.take(f"{prefix}patch_embed.proj.bias")},
        "cls_token": src.take(f"{prefix}cls_token"),
        "pos_embed": src.take(f"{prefix}pos_embed"),
        **_blocks(src, f"{prefix}blocks", depth, TIMM_BLOCK, num_heads),
        "norm": layer_norm(src, f"{prefix}norm"),
    }


def openai_vit(src: TensorSource, prefix: str, *, depth: int, num_heads: int) -> tuple[dict, np.ndarray]:
    """OpenAI / open_clip VisionTransformer -> (our ViT with pre_norm and no patch bias, image projection [W, E])."""
    class_embedding = src.take(f"{prefix}class_embedding")
    params = {
        "patch_embed": {"kernel": conv_kernel(src.take(f"{prefix}conv1.weight"))},
        "cls_token": class_embedding.reshape(1, 1, -1),
        "pos_embed": src.take(f"{prefix}positional_embedding")[None],
        "norm_pre": layer_norm(src, f"{prefix}ln_pre"),
        **_blocks(src, f"{prefix}transformer.resblocks", depth, OPENAI_BLOCK, num_heads),
        # open_clip applies ln_post to the pooled CLS token; ours normalises every token, same CLS.
        "norm": layer_norm(src, f"{prefix}ln_post"),
    }
    return params, src.take(f"{prefix}proj")


def openai_text(src: TensorSource, *, depth: int, num_heads: int) -> dict:
    """OpenAI-CLIP text tower (top-level keys in both the reference and open_clip) -> our TextTransformer."""
    return {
        "token_embedding": {"embedding": src.take("token_embedding.weight")},
        "positional_embedding": src.take("positional_embedding"),
        **_blocks(src, "transformer.resblocks", depth, OPENAI_BLOCK, num_heads),
        "ln_final": layer_norm(src, "ln_final"),
        "text_projection": src.take("text_projection"),
    }


def grounding_decoder(src: TensorSource, *, depth: int, num_heads: int) -> dict:
    """model/tfm.py ObjDecoder(Cross_Attention(...)) -> our GroundingDecoder."""
    def decoder_layer(prefix: str) -> dict:
        return {
            "norm1": layer_norm(src, f"{prefix}.norm1"),
            "self_attn": attention(src, f"{prefix}.self_attn.in_proj_weight", f"{prefix}.self_attn.in_proj_bias",
                                   f"{prefix}.self_attn.out_proj", num_heads),
            "norm2": layer_norm(src, f"{prefix}.norm2"),
            "cross_attn": attention(src, f"{prefix}.multihead_attn.in_proj_weight",
                                    f"{prefix}.multihead_attn.in_proj_bias", f"{prefix}.multihead_attn.out_proj",
                                    num_heads),
            "norm3": layer_norm(src, f"{prefix}.norm3"),
            "mlp": {"fc1": dense(src, f"{prefix}.linear1"), "fc2": dense(src, f"{prefix}.linear2")},
        }

    return {
        "input_proj": dense(src, "proj", bias=False),
        "pre_norm": layer_norm(src, "transformer.pre_norm"),
        "query_embed": src.take("query_embed.weight"),
        **{f"layers_{i}": decoder_layer(f"transformer.decoder.layers.{i}") for i in range(depth)},
        "decoder_norm": layer_norm(src, "transformer.decoder.norm"),
        "bbox_embed": {f"layers_{j}": dense(src, f"bbox_embed.layers.{j}") for j in range(3)},
        "obj_proj": src.take("obj_proj"),
        "img_proj": src.take("img_proj"),
    }
