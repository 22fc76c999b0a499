"""OWLv2 open-vocabulary detector (Minderer et al. 2023) as transformers' ``Owlv2ForObjectDetection`` computes it.

The authors of GRAIN ground each MLLM description in a box with ``google/owlv2-base-patch16-ensemble``
(box_supervision.py). This is the same network in Flax, built from our towers:

* image tower: an OpenAI-CLIP ViT (``VisionTransformer`` with ``pre_norm``, no qk-norm, no patch bias,
  quick-GELU, LayerNorm eps 1e-5) whose final LayerNorm (transformers' ``post_layernorm``) runs on every
  token;
* text tower: CLIP's causal text transformer (``TextTransformer``, context 16) whose projected EOT feature,
  L2-normalised, embeds a query;
* heads on the patch tokens ``x_p = LN(post(x_p) * post(x_cls))``:
  class head ``(<dense0(x_p)/|.|, q/|q|> + shift(x_p)) * (elu(scale(x_p)) + 1)``,
  box head ``sigmoid(MLP(x_p) + bias_p)`` (cxcywh in [0, 1], ``bias_p`` centres the box on its patch),
  objectness head ``MLP(x_p)`` (logits).

Shapes: pixels [B, S, S, 3] (CLIP-normalised), query tokens [B, Q, L] -> boxes [B, P, 4], logits [B, P, Q],
objectness [B, P] with P = (S / patch)^2 in row-major patch order. A query whose first token is 0 (all
padding) gets the most negative logit, as in transformers.

Parameter names (transformers -> ours): ``owlv2.vision_model`` -> ``vision`` (see vit.py),
``owlv2.text_model`` + ``owlv2.text_projection`` -> ``text`` (see text.py), ``layer_norm`` -> ``merge_norm``,
``class_head.{dense0,logit_shift,logit_scale}``, ``box_head``/``objectness_head.dense{0,1,2}`` -> same names.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.models import layers, text, vit


@dataclasses.dataclass(frozen=True)
class OwlV2Config:
    """The architecture fields of a transformers ``Owlv2Config`` that the network depends on."""
    image_size: int = 960
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    text_length: int = 16
    vocab_size: int = 49408
    embed_dim: int = 512
    ln_eps: float = 1e-5

    @classmethod
    def from_transformers(cls, config: dict) -> "OwlV2Config":
        """From a transformers ``config.json`` dict (an ``Owlv2Config``), checking what we do not implement."""
        vision, txt = config.get("vision_config", {}), config.get("text_config", {})
        for name, sub in (("vision_config", vision), ("text_config", txt)):
            if sub.get("hidden_act", "quick_gelu") != "quick_gelu":
                raise ValueError(f"OWLv2 {name}.hidden_act {sub['hidden_act']!r} is not supported (quick_gelu only)")
        if vision.get("layer_norm_eps", 1e-5) != txt.get("layer_norm_eps", 1e-5):
            raise ValueError("OWLv2 vision and text layer_norm_eps differ; one value is supported")
        if txt.get("hidden_size", 512) != config.get("projection_dim", 512):
            raise ValueError("OWLv2 text_config.hidden_size must equal projection_dim (the class head maps image "
                             "features to the text width and compares them with projected queries)")
        return cls(image_size=vision.get("image_size", 768), patch_size=vision.get("patch_size", 16),
                   vision_width=vision.get("hidden_size", 768), vision_depth=vision.get("num_hidden_layers", 12),
                   vision_heads=vision.get("num_attention_heads", 12),
                   vision_mlp_dim=vision.get("intermediate_size", 3072),
                   text_width=txt.get("hidden_size", 512), text_depth=txt.get("num_hidden_layers", 12),
                   text_heads=txt.get("num_attention_heads", 8), text_mlp_dim=txt.get("intermediate_size", 2048),
                   text_length=txt.get("max_position_embeddings", 16), vocab_size=txt.get("vocab_size", 49408),
                   embed_dim=config.get("projection_dim", 512), ln_eps=vision.get("layer_norm_eps", 1e-5))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def box_bias(grid: int) -> np.ndarray:
    """[grid^2, 4] logit-space prior: each patch's box centred on the patch's far corner, one patch in size.

    transformers' ``compute_box_bias``: centres (i+1)/grid, sizes 1/grid, mapped through logit(x) with 1e-4 slack.
    """
    coords = np.arange(1, grid + 1, dtype=np.float32) / grid
    xx, yy = np.meshgrid(coords, coords, indexing="xy")
    centres = np.clip(np.stack([xx, yy], -1).reshape(-1, 2), 0.0, 1.0)
    sizes = np.full_like(centres, 1.0 / grid)

    def logit(x):
        return np.log(x + 1e-4) - np.log1p(-x + 1e-4)

    return np.concatenate([logit(centres), logit(sizes)], -1).astype(np.float32)


class _Mlp3(nn.Module):
    """dense0 -> GELU -> dense1 -> GELU -> dense2: [..., W] -> [..., out] (OWL's box / objectness head)."""
    out_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        gelu = layers.activation_fn("gelu")
        common = dict(kernel_init=layers.TORCH_DEFAULT_KERNEL, bias_init=layers.torch_default_bias(width),
                      dtype=self.dtype, param_dtype=self.param_dtype)
        x = gelu(layers.dense(width, ("embed", "mlp"), name="dense0", **common)(x))
        x = gelu(layers.dense(width, ("mlp", "embed"), name="dense1", **common)(x))
        return layers.dense(self.out_dim, ("embed", None), name="dense2", **common)(x).astype(jnp.float32)


class _ClassHead(nn.Module):
    """features [B, P, W], unit queries [B, Q, E] -> logits [B, P, Q]: shifted, scaled cosine similarity."""
    embed_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, queries: jax.Array) -> jax.Array:
        dense = functools.partial(layers.dense, kernel_init=layers.TORCH_DEFAULT_KERNEL,
                                  bias_init=layers.torch_default_bias(features.shape[-1]), dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        class_embeds = dense(self.embed_dim, ("embed", None), name="dense0")(features).astype(jnp.float32)
        class_embeds = class_embeds / (jnp.linalg.norm(class_embeds, axis=-1, keepdims=True) + 1e-6)
        queries = queries / (jnp.linalg.norm(queries, axis=-1, keepdims=True) + 1e-6)
        logits = jnp.einsum("bpd,bqd->bpq", class_embeds, queries)
        shift = dense(1, ("embed", None), name="logit_shift")(features).astype(jnp.float32)
        scale = jax.nn.elu(dense(1, ("embed", None), name="logit_scale")(features).astype(jnp.float32)) + 1
        return (logits + shift) * scale


class OwlV2(nn.Module):
    """transformers ``Owlv2ForObjectDetection`` forward (text queries): see the module docstring."""
    config: OwlV2Config = OwlV2Config()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c, common = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.vision_mlp_dim % c.vision_width or c.text_mlp_dim != 4 * c.text_width:
            raise ValueError("OWLv2: the MLP width must be a multiple of the vision width and 4x the text width")
        self.vision = vit.VisionTransformer(
            width=c.vision_width, depth=c.vision_depth, num_heads=c.vision_heads, patch_size=c.patch_size,
            image_size=c.image_size, mlp_ratio=c.vision_mlp_dim // c.vision_width, qk_norm=False, pre_norm=True,
            patch_bias=False, activation="quick_gelu", ln_eps=c.ln_eps, **common)
        self.text = text.TextTransformer(
            width=c.text_width, depth=c.text_depth, num_heads=c.text_heads, context_length=c.text_length,
            vocab_size=c.vocab_size, embed_dim=c.embed_dim, activation="quick_gelu", **common)
        self.merge_norm = layers.layer_norm(c.ln_eps, self.param_dtype)
        self.class_head = _ClassHead(c.text_width, **common)
        self.box_head = _Mlp3(4, **common)
        self.objectness_head = _Mlp3(1, **common)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, 3] -> patch features [B, P, W] f32 (class token merged in, LayerNorm'd)."""
        tokens = self.vision(pixels)  # post-LayerNorm on every token
        return self.merge_norm(tokens[:, 1:] * tokens[:, :1])

    def embed_queries(self, tokens: jax.Array) -> jax.Array:
        """tokens [N, L] -> unit query embeddings [N, E] f32."""
        embedding, _ = self.text(tokens)
        return embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True)

    def heads(self, features: jax.Array, queries: jax.Array, query_mask: jax.Array) -> dict[str, jax.Array]:
        """features [B, P, W], queries [B, Q, E], query_mask [B, Q] bool -> boxes, logits, objectness."""
        logits = jnp.where(query_mask[:, None, :], self.class_head(features, queries), jnp.finfo(jnp.float32).min)
        # transformers detaches the features before the objectness head; the forward values are the same.
        objectness = self.objectness_head(features)[..., 0]
        boxes = jax.nn.sigmoid(self.box_head(features) + box_bias(self.config.grid))
        return {"boxes": boxes, "logits": logits, "objectness": objectness}

    def __call__(self, pixels: jax.Array, query_tokens: jax.Array) -> dict[str, jax.Array]:
        """pixels [B, S, S, 3], query_tokens [B, Q, L] -> {"boxes" [B, P, 4] cxcywh, "logits" [B, P, Q],
        "objectness" [B, P]}."""
        if query_tokens.ndim != 3:
            raise ValueError(f"query tokens must be [B, Q, L], got {query_tokens.shape}")
        batch, num_queries, length = query_tokens.shape
        queries = self.embed_queries(query_tokens.reshape(batch * num_queries, length))
        return self.heads(self.image_features(pixels), queries.reshape(batch, num_queries, -1),
                          query_tokens[..., 0] > 0)
