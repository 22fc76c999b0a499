"""The two-tower model: ViT + CLIP text tower + (GRAIN) grounding decoder, with one logit scale.

Modes:
* ``"grain"``: image embedding = global query of the decoder @ img_proj; region embeddings and boxes
  from the region queries. The ViT's CLS projection does not exist (the reference's is unused).
* ``"clip"``: image embedding = CLS token (after the final LN) @ ``image_projection``; no decoder.

``out`` keys (all float32, see docs/interfaces.md section 4): img/embedding [B, E], txt/caption [B, E],
txt/descriptions [B, M, E], dec/region_embeddings [B, Q, E], dec/boxes [B, Q, 4] cxcywh in [0, 1],
dec/layer_boxes [L, B, Q, 4], logit_scale []. ``aux``: img/tokens [B, 1+N, Wv],
txt/caption_features [B, Lc, Wt], dec/hidden [L, B, Q+1, D].

Text work that cannot change the result is skipped (models/text_batching.py), opt-in:
``description_budget`` < 1: only the valid (non-zero) description slots are encoded, packed into
``ceil8(budget * B * M)`` rows; padding slots of ``txt/descriptions`` are then zero (the losses mask
them). The caller checks on the host that a batch fits (``text_batching.fit_batch``) and runs a batch
with more valid descriptions through the same model with ``description_budget=1`` (every slot: same
values, full cost); one that comes in anyway gets NaN description embeddings, never silently fewer. Texts are
encoded at the length they come in: cutting a batch to a shorter length bucket is the caller's
(``config.data.text_length_buckets``, ``text_batching.fit_texts`` on the host).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from grain_jax.models import layers, text_batching
from grain_jax.models.grounding_decoder import GroundingDecoder
from grain_jax.models.text import TextTransformer
from grain_jax.models.vit import VisionTransformer, decode_variant

MODES = ("grain", "clip")


class GrainModel(nn.Module):
    """GRAIN (or the CLIP baseline). Defaults are the paper's ViT-B/16 configuration."""
    mode: str = "grain"
    embed_dim: int = 512
    image_size: int = 224
    # Image tower: a variant name plus the OpenAI-CLIP options (see vit.py).
    vit_variant: str = "B/16"
    vit_qk_norm: bool = True
    vit_pre_norm: bool = False
    vit_patch_bias: bool = True
    vit_activation: str = "gelu"
    vit_ln_eps: float = 1e-6
    # Text tower.
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_activation: str = "quick_gelu"  # OpenAI CLIP; open_clip's LAION architectures use "gelu"
    # Grounding decoder (GRAIN mode only).
    num_queries: int = 5
    decoder_width: int = 512
    decoder_heads: int = 8
    decoder_layers: int = 6
    decoder_mlp_dim: int = 2048
    decoder_dropout: float = 0.1
    decoder_query_init_std: float = 1.0  # the reference's nn.Embedding: N(0, 1) query embeddings
    # Numerics.
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    # One nn.scan per tower over its identical blocks (compiles one block instead of depth copies); the params
    # are then stacked on a leading "layers" axis. False = the reference / converter layout. models/scan.py.
    scan_layers: bool = False
    attention_impl: str = "auto"  # layers.ATTENTION_IMPLS: "auto" = cuDNN flash on GPU in bf16, else explicit
    # Text work skipped (see the module docstring): fraction of description slots encoded.
    description_budget: float = 1.0

    @property
    def has_grounding(self) -> bool:
        """GRAIN mode: a grounding decoder (boxes, region embeddings) trained on region descriptions; the CLIP
        baseline has an image projection instead and no use for descriptions."""
        return self.mode == "grain"

    def setup(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat_policy,
                      scan_layers=self.scan_layers, attention_impl=self.attention_impl)
        vit = decode_variant(self.vit_variant)
        self.image = VisionTransformer(
            **vit, image_size=self.image_size, qk_norm=self.vit_qk_norm, pre_norm=self.vit_pre_norm,
            patch_bias=self.vit_patch_bias, activation=self.vit_activation, ln_eps=self.vit_ln_eps, **common)
        self.text = TextTransformer(
            width=self.text_width, depth=self.text_layers, num_heads=self.text_heads,
            context_length=self.context_length, vocab_size=self.vocab_size, embed_dim=self.embed_dim,
            activation=self.text_activation, **common)
        if self.has_grounding:
            self.decoder = GroundingDecoder(
                num_queries=self.num_queries, width=self.decoder_width, num_heads=self.decoder_heads,
                depth=self.decoder_layers, mlp_dim=self.decoder_mlp_dim, dropout_rate=self.decoder_dropout,
                query_init_std=self.decoder_query_init_std, embed_dim=self.embed_dim, **common)
        else:
            self.image_projection = layers.projection(self, "image_projection", (vit["width"], self.embed_dim),
                                                      self.param_dtype)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(math.log(1 / 0.07)), ()), (), self.param_dtype)

    def _image_outputs(self, images: jax.Array, train: bool) -> tuple[dict, dict]:
        tokens = self.image(images)  # [B, 1+N, Wv] f32
        aux = {"img/tokens": tokens}
        if not self.has_grounding:
            embedding = tokens[:, 0] @ self.image_projection.astype(jnp.float32)
            return {"img/embedding": embedding}, aux
        dec = self.decoder(tokens, train=train)
        aux["dec/hidden"] = dec["hidden"]
        out = {
            "img/embedding": dec["image_embedding"],
            "dec/region_embeddings": dec["region_embeddings"],
            "dec/boxes": dec["boxes"],
            "dec/layer_boxes": dec["layer_boxes"],
        }
        return out, aux

    def encode_image(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """images [B, S, S, 3] -> {img/embedding [B, E]} (+ dec/boxes, dec/region_embeddings for GRAIN)."""
        out, _ = self._image_outputs(images, train)
        out.pop("dec/layer_boxes", None)
        return out

    def _text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [..., L] -> (embeddings [..., E], features [..., L, Wt])."""
        embedding, features = self.text(tokens.reshape(-1, tokens.shape[-1]))
        return (embedding.reshape(*tokens.shape[:-1], -1),
                features.reshape(*tokens.shape, -1))

    def every_description_slot(self) -> "GrainModel":
        """This model with no description packing (same parameters): what runs a batch whose valid descriptions
        exceed ``description_budget`` (``text_batching.fit_batch`` says which, on the host)."""
        return self.clone(description_budget=1.0)

    def _descriptions(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """tokens [B, M, Ld] -> {txt/descriptions [B, M, E]}."""
        batch, slots, length = tokens.shape
        flat = tokens.reshape(batch * slots, length)
        capacity = text_batching.description_capacity(batch * slots, self.description_budget)
        if capacity == batch * slots:
            return {"txt/descriptions": self.encode_text(tokens)}
        rows, index = text_batching.pack(flat, capacity)
        embeddings = text_batching.unpack(self.encode_text(rows), index, flat.shape[0])
        # No in-step fallback: under autodiff a cond keeps (and writes) the residuals of both branches.
        overflow = jnp.sum(text_batching.valid_rows(flat)) > capacity
        return {"txt/descriptions": jnp.where(overflow, jnp.nan, embeddings).reshape(batch, slots, -1)}

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens [..., L] int -> unnormalised embeddings [..., E] f32 (e.g. [N, L] -> [N, E])."""
        return self._text(tokens)[0]

    def __call__(self, images: jax.Array, caption_tokens: jax.Array, description_tokens: jax.Array | None = None,
                 train: bool = False) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """images [B, S, S, 3], caption_tokens [B, Lc], description_tokens [B, M, Ld] or None -> (out, aux)."""
        out, aux = self._image_outputs(images, train)
        out["txt/caption"], aux["txt/caption_features"] = self._text(caption_tokens)
        if description_tokens is not None:
            out.update(self._descriptions(description_tokens))
        out["logit_scale"] = self.logit_scale.astype(jnp.float32)
        return out, aux
