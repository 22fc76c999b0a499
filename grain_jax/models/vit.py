"""Image tower: the reference's timm ViT with QK-norm (and, as options, OpenAI CLIP's ViT).

Default (GRAIN reference, clip/custom_models.py on timm 0.9.12): patch conv with bias, CLS token,
learned position embedding over CLS + patches, no pre-norm, pre-LN blocks with fused qkv (bias) and
per-head LayerNorm on q and k, exact GELU MLP (4x), LayerNorm eps 1e-6, final LayerNorm over all tokens.

OpenAI/open_clip ViT options (`qk_norm=False, pre_norm=True, patch_bias=False,
activation="quick_gelu", ln_eps=1e-5`): `ln_pre` after the position embedding and the final
LayerNorm (`ln_post`) applied to every token, which equals open_clip's LN on the pooled CLS.

Parameter names (PyTorch timm name -> ours): patch_embed.proj -> patch_embed (kernel [p, p, 3, W]);
cls_token [1, 1, W]; pos_embed [1, 1 + N, W]; norm_pre (OpenAI ln_pre); blocks.{i} -> blocks_{i}
(norm1, attn{qkv_kernel, qkv_bias, q_norm, k_norm, out_kernel, out_bias}, norm2, mlp{fc1, fc2}); norm.

Init: what the reference really produces where cheap: blocks with PyTorch's default Linear init (the
subclass rebuilds timm's blocks, discarding timm's trunc-normal init), patch conv PyTorch default,
pos_embed N(0, 0.02) (timm's trunc_normal_ cuts at +-2 absolute, i.e. effectively untruncated),
cls_token N(0, 1e-6).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from grain_jax.models import layers, scan

# name -> (width, depth, heads). S uses 12 heads as the reference does (timm's vit_small has 6).
# Mu is a CPU-sized variant for tests and the demo.
VIT_VARIANTS: dict[str, tuple[int, int, int]] = {
    "Mu": (128, 3, 4),
    "Ti": (192, 12, 3),
    "S": (384, 12, 12),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
    """``"B/16"`` -> ``dict(width=768, depth=12, num_heads=12, patch_size=16)``."""
    name, _, patch = variant.partition("/")
    if name not in VIT_VARIANTS or not patch.isdigit():
        raise ValueError(f"unknown ViT variant {variant!r}; expected '<size>/<patch>' with size in "
                         f"{sorted(VIT_VARIANTS)}, e.g. 'B/16'")
    width, depth, heads = VIT_VARIANTS[name]
    return dict(width=width, depth=depth, num_heads=heads, patch_size=int(patch))


class VisionTransformer(nn.Module):
    """images [B, S, S, 3] -> tokens [B, 1 + (S/p)^2, W] float32 after the final LayerNorm, CLS first."""
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    mlp_ratio: int = 4
    qk_norm: bool = True
    pre_norm: bool = False
    patch_bias: bool = True
    activation: str = "gelu"
    ln_eps: float = 1e-6
    remat_policy: str = "none"
    scan_layers: bool = False  # one nn.scan over the blocks (params blocks/... [depth, ...]; models/scan.py)
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"images must be [B, {size}, {size}, 3] (model image_size={size}), got {images.shape}")
        if size % self.patch_size:
            raise ValueError(f"image_size {size} is not a multiple of patch_size {self.patch_size}")
        num_tokens = 1 + (size // self.patch_size) ** 2
        fan_in = 3 * self.patch_size ** 2

        x = nn.Conv(
            self.width, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
            padding="VALID", use_bias=self.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(layers.TORCH_DEFAULT_KERNEL, (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(layers.torch_default_bias(fan_in), ("norm",)),
            name="patch_embed")(images)
        # Row-major patch order, as PyTorch's flatten(2) of the NCHW conv output.
        x = x.reshape(x.shape[0], -1, self.width).astype(jnp.float32)

        cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(1e-6), (None, None, "embed")),
                         (1, 1, self.width), self.param_dtype)
        pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "seq", "embed")),
                         (1, num_tokens, self.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(jnp.float32), x], axis=1)
        x = nn.with_logical_constraint(x + pos.astype(jnp.float32), layers.ACT_AXES)
        if self.pre_norm:
            x = layers.layer_norm(self.ln_eps, self.param_dtype, name="norm_pre")(x)

        block_cls = layers.remat(layers.EncoderBlock, self.remat_policy, scanned=self.scan_layers)
        block = functools.partial(block_cls, self.num_heads, self.mlp_ratio * self.width, activation=self.activation,
                                  ln_eps=self.ln_eps, qk_norm=self.qk_norm, attention_impl=self.attention_impl,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan_layers:
            x, _ = scan.scan_blocks(block(name="blocks"), x, length=self.depth)
        else:
            for i in range(self.depth):
                x = block(name=f"blocks_{i}")(x)
        return layers.layer_norm(self.ln_eps, self.param_dtype, name="norm")(x)
