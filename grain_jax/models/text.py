"""Text tower: OpenAI CLIP's causal text transformer (clip/custom_models.py `CLIP.encode_text`).

token embedding + learned positional embedding -> pre-LN blocks (causal mask, QuickGELU MLP 4x (``activation``
"gelu" for open_clip's exact-GELU architectures),
LayerNorm eps 1e-5) -> final LayerNorm -> feature at the EOT position (argmax of the ids, EOT being
the largest id) -> ``text_projection`` (no bias).

Length-agnostic: texts of any length L <= context_length use the first L positional embeddings and
an L x L causal mask. Because attention is causal and the EOT feature only sees tokens before it,
the embedding of a text does not depend on how much zero padding follows it.

Parameter names (PyTorch -> ours): token_embedding (embedding [V, W]); positional_embedding [C, W];
transformer.resblocks.{i} -> blocks_{i} (ln_1 -> norm1, attn.in_proj -> attn.qkv_*,
attn.out_proj -> attn.out_*, ln_2 -> norm2, mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2);
ln_final; text_projection [W, E].

Init as CLIP's ``initialize_parameters``: token N(0, 0.02), positions N(0, 0.01), in-proj N(0, W^-0.5),
out-proj and c_proj N(0, W^-0.5 (2 depth)^-0.5), c_fc N(0, (2W)^-0.5), attention biases 0, MLP biases
PyTorch default, text_projection N(0, W^-0.5).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from grain_jax.models import layers, scan
from grain_jax.models.vocab_parallel import VocabParallelEmbed


class TextTransformer(nn.Module):
    """tokens [N, L] int (SOT ... EOT, zero padded) -> (embedding [N, E] f32, features [N, L, W] f32)."""
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512
    activation: str = "quick_gelu"
    remat_policy: str = "none"
    scan_layers: bool = False  # one nn.scan over the blocks (params blocks/... [depth, ...]; models/scan.py)
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be [N, L], got {tokens.shape}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"text length {length} exceeds context_length {self.context_length}")

        embed = VocabParallelEmbed(
            self.vocab_size, self.width, dtype=jnp.float32, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding")
        positions = self.param(
            "positional_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.01), ("seq", "embed")),
            (self.context_length, self.width), self.param_dtype)
        x = embed(tokens) + positions[:length].astype(jnp.float32)

        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.depth) ** -0.5
        init = layers.BlockInit(
            qkv=nn.initializers.normal(attn_std), out=nn.initializers.normal(proj_std),
            fc1=nn.initializers.normal((2 * self.width) ** -0.5), fc2=nn.initializers.normal(proj_std),
            zero_attn_bias=True)
        block_cls = layers.remat(layers.EncoderBlock, self.remat_policy, scanned=self.scan_layers)
        block = functools.partial(block_cls, self.num_heads, 4 * self.width, activation=self.activation, ln_eps=1e-5,
                                  causal=True, init=init, attention_impl=self.attention_impl, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        if self.scan_layers:
            x, _ = scan.scan_blocks(block(name="blocks"), x, length=self.depth)
        else:
            for i in range(self.depth):
                x = block(name=f"blocks_{i}")(x)
        features = layers.layer_norm(1e-5, self.param_dtype, name="ln_final")(x)

        eot = jnp.argmax(tokens, axis=-1)  # [N]; EOT (49407) is the largest id
        pooled = jnp.take_along_axis(features, eot[:, None, None], axis=1)[:, 0]  # [N, W]
        text_projection = layers.projection(self, "text_projection", (self.width, self.embed_dim), self.param_dtype)
        # Final projection in float32: these are the embeddings the contrastive losses compare.
        embedding = pooled @ text_projection.astype(jnp.float32)
        return nn.with_logical_constraint(embedding, ("batch", "act_embed")), features
