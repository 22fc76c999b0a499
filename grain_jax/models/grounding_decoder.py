"""Grounding decoder: DETR's pre-norm transformer decoder on ViT tokens (model/tfm.py
`Cross_Attention(normalize_before=True, return_intermediate_dec=True)` + `ObjDecoder`).

memory = LN_pre(Linear_no_bias(ViT tokens)), no positional term, no mask. Targets start at zero;
``num_queries + 1`` learned queries act as positions added to q and k of self-attention and to q of
cross-attention (never to v). Per layer: self-attention, cross-attention, ReLU FFN, each pre-norm
with dropout on attention probabilities, residuals and the FFN hidden layer. One shared final
LayerNorm is applied to every layer's output. Region queries 0..Q-1 give boxes (MLP D-D-4 +
sigmoid, cxcywh in [0, 1]) and region embeddings (@ obj_proj); the last query is the global image
query (@ img_proj). The reference's dead weights (22048-way class head, pos_embed, temporal_embed)
are left out.

Parameter names (PyTorch -> ours): proj -> input_proj; transformer.pre_norm -> pre_norm;
query_embed.weight -> query_embed [Q+1, D]; transformer.decoder.layers.{i} -> layers_{i}
(self_attn, multihead_attn -> cross_attn, norm1..3, linear1/linear2 -> mlp.fc1/fc2);
transformer.decoder.norm -> decoder_norm; bbox_embed.layers.{j} -> bbox_embed.layers_{j};
obj_proj, img_proj [D, E].

Init as the reference: Xavier-uniform on every decoder-layer matrix (packed in-projection as one
[3D, D] matrix), attention biases 0, FFN biases PyTorch default; input_proj and box MLP PyTorch
default; queries N(0, 1); obj_proj / img_proj N(0, D^-0.5). LayerNorm eps 1e-5.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from grain_jax.models import layers, scan

_DECODER_INIT = layers.BlockInit(qkv=layers.XAVIER_UNIFORM, out=layers.XAVIER_UNIFORM, fc1=layers.XAVIER_UNIFORM,
                                 fc2=layers.XAVIER_UNIFORM, zero_attn_bias=True)
_LN_EPS = 1e-5


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, self-attention first. tgt [B, Q+1, D], memory [B, N, D] -> [B, Q+1, D]."""
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    deterministic: bool = True
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tgt: jax.Array, query_pos: jax.Array, memory: jax.Array) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(init=_DECODER_INIT, dropout_rate=self.dropout_rate, deterministic=self.deterministic,
                    attention_impl=self.attention_impl, **common)

        def drop(x):
            return nn.Dropout(self.dropout_rate)(x, deterministic=self.deterministic)

        y = layers.layer_norm(_LN_EPS, self.param_dtype, name="norm1")(tgt)
        y = layers.MultiHeadAttention(self.num_heads, name="self_attn", **attn)(y + query_pos, y + query_pos, y)
        tgt = tgt + drop(y)
        y = layers.layer_norm(_LN_EPS, self.param_dtype, name="norm2")(tgt)
        y = layers.MultiHeadAttention(self.num_heads, name="cross_attn", **attn)(y + query_pos, memory, memory)
        tgt = tgt + drop(y)
        y = layers.layer_norm(_LN_EPS, self.param_dtype, name="norm3")(tgt)
        y = layers.Mlp(self.mlp_dim, "relu", init=_DECODER_INIT, dropout_rate=self.dropout_rate,
                       deterministic=self.deterministic, name="mlp", **common)(y)
        tgt = tgt + drop(y)
        return nn.with_logical_constraint(tgt.astype(jnp.float32), layers.ACT_AXES)


class BoxHead(nn.Module):
    """hidden [..., D] -> boxes [..., 4] cxcywh in [0, 1]: Linear-ReLU-Linear-ReLU-Linear (f32) + sigmoid."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        for j in range(2):
            x = jax.nn.relu(layers.dense(width, ("embed", "mlp") if j == 0 else ("mlp", "embed"),
                                         kernel_init=layers.TORCH_DEFAULT_KERNEL,
                                         bias_init=layers.torch_default_bias(width), dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=f"layers_{j}")(x))
        # Final layer in float32: box coordinates feed L1 / GIoU losses and the matcher.
        x = layers.dense(4, ("embed", None), kernel_init=layers.TORCH_DEFAULT_KERNEL,
                         bias_init=layers.torch_default_bias(width), dtype=jnp.float32,
                         param_dtype=self.param_dtype, name="layers_2")(x)
        return jax.nn.sigmoid(x.astype(jnp.float32))


class GroundingDecoder(nn.Module):
    """ViT tokens [B, N, Wv] -> dict (all float32):

    hidden [L, B, Q+1, D] (each layer's output after the shared final LN), layer_boxes [L, B, Q, 4],
    boxes [B, Q, 4] (last layer), region_embeddings [B, Q, E], image_embedding [B, E].
    """
    num_queries: int = 5
    width: int = 512
    num_heads: int = 8
    depth: int = 6
    mlp_dim: int = 2048
    dropout_rate: float = 0.1
    query_init_std: float = 1.0
    embed_dim: int = 512
    remat_policy: str = "none"
    scan_layers: bool = False  # one nn.scan over the layers (params layers/... [depth, ...]; models/scan.py)
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, vision_tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        memory = layers.dense(self.width, ("embed", None), kernel_init=layers.TORCH_DEFAULT_KERNEL, bias_init=None,
                              name="input_proj", **common)(vision_tokens)
        memory = layers.layer_norm(_LN_EPS, self.param_dtype, name="pre_norm")(memory)
        memory = nn.with_logical_constraint(memory, layers.ACT_AXES)

        num_slots = self.num_queries + 1  # region queries, then the global image query
        queries = self.param("query_embed", nn.with_logical_partitioning(nn.initializers.normal(self.query_init_std),
                                                                      ("seq", "embed")),
                             (num_slots, self.width), self.param_dtype).astype(jnp.float32)
        # zeros_like, not zeros: inside a shard_map (GradCache's groups) the scanned layers' carry must vary over
        # the mesh axes its inputs vary over, or nn.scan refuses the carry.
        tgt = jnp.broadcast_to(jnp.zeros_like(vision_tokens[:, :1, :1], jnp.float32),
                               (vision_tokens.shape[0], num_slots, self.width))
        final_norm = layers.layer_norm(_LN_EPS, self.param_dtype, name="decoder_norm")

        layer_cls = layers.remat(DecoderLayer, self.remat_policy, scanned=self.scan_layers)
        layer = functools.partial(layer_cls, self.num_heads, self.mlp_dim, self.dropout_rate, deterministic=not train,
                                  attention_impl=self.attention_impl, **common)
        if self.scan_layers:
            _, outputs = scan.scan_blocks(layer(name="layers"), tgt, queries, memory, length=self.depth, collect=True)
            hidden = final_norm(outputs)  # [L, B, Q+1, D]: the norm is per token, so per layer as unrolled
        else:
            hidden = []
            for i in range(self.depth):
                tgt = layer(name=f"layers_{i}")(tgt, queries, memory)
                hidden.append(final_norm(tgt))
            hidden = jnp.stack(hidden)  # [L, B, Q+1, D]

        layer_boxes = BoxHead(name="bbox_embed", **common)(hidden[:, :, :self.num_queries])
        last = hidden[-1]
        obj_proj = layers.projection(self, "obj_proj", (self.width, self.embed_dim), self.param_dtype)
        img_proj = layers.projection(self, "img_proj", (self.width, self.embed_dim), self.param_dtype)
        return {
            "hidden": hidden,
            "layer_boxes": layer_boxes,
            "boxes": layer_boxes[-1],
            "region_embeddings": last[:, :self.num_queries] @ obj_proj.astype(jnp.float32),
            "image_embedding": last[:, self.num_queries] @ img_proj.astype(jnp.float32),
        }
