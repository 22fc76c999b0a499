"""Model registry: ``create_model(name, **overrides)``, ``list_models()``, ``param_counts(model)``.

Every name builds a :class:`GrainModel`; overrides are any of its attributes (e.g. ``num_queries``,
``image_size``, ``vit_variant``, ``decoder_layers``, ``dtype="bfloat16"``, ``remat_policy="full"``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from grain_jax.models.grain_model import GrainModel

# OpenAI / open_clip ViT (no qk-norm, ln_pre, bias-free patch conv, QuickGELU, LN eps 1e-5), so
# open_clip's OpenAI weights can be converted into the CLIP-mode model exactly.
OPENAI_VIT = dict(vit_qk_norm=False, vit_pre_norm=True, vit_patch_bias=False, vit_activation="quick_gelu",
                  vit_ln_eps=1e-5)
# CPU-sized: a train step at 64 px, batch 32, short texts takes well under a second on 2 cores.
TINY = dict(vit_variant="Mu/8", image_size=64, embed_dim=128, text_width=128, text_heads=4, text_layers=3,
            decoder_width=128, decoder_heads=4, decoder_layers=2, decoder_mlp_dim=256)

_REGISTRY: dict[str, dict[str, Any]] = {
    "grain-vit-s16": dict(mode="grain", vit_variant="S/16"),
    "grain-vit-b16": dict(mode="grain", vit_variant="B/16"),
    "grain-vit-l14": dict(mode="grain", vit_variant="L/14"),
    "clip-vit-s16": dict(mode="clip", vit_variant="S/16"),
    "clip-vit-b16": dict(mode="clip", vit_variant="B/16"),
    "clip-vit-l14": dict(mode="clip", vit_variant="L/14"),
    "clip-vit-b16-openai": dict(mode="clip", vit_variant="B/16", **OPENAI_VIT),
    "grain-tiny": dict(mode="grain", **TINY),
    "clip-tiny": dict(mode="clip", **TINY),
    "clip-tiny-openai": dict(mode="clip", **TINY, **OPENAI_VIT),
}

_FIELDS = {f.name for f in dataclasses.fields(GrainModel)} - {"parent", "name"}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, **overrides) -> GrainModel:
    """A registered model, e.g. ``create_model("grain-vit-b16", num_queries=10, dtype="bfloat16")``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    if "text_length_buckets" in overrides:  # a model field until texts were cut on the host
        raise ValueError("text_length_buckets is no longer a model option: set config.data.text_length_buckets "
                         "(batches are cut to the bucket on the host, models/text_batching.py); checkpoints that have it "
                         "are read without it")
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for model {name!r}; valid: {sorted(_FIELDS)}")
    config = {**_REGISTRY[name], **overrides}
    for key in ("dtype", "param_dtype"):  # configs may spell dtypes as strings
        if key in config:
            config[key] = jnp.dtype(config[key])
    return GrainModel(**config)


def init_inputs(model: GrainModel, batch_size: int = 1, caption_length: int | None = None,
                description_length: int | None = None, max_boxes: int = 5) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract (images, caption_tokens, description_tokens) for ``model.init`` under ``jax.eval_shape``."""
    caption_length = caption_length or model.context_length
    description_length = description_length or model.context_length
    return (jax.ShapeDtypeStruct((batch_size, model.image_size, model.image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, caption_length), jnp.int32),
            jax.ShapeDtypeStruct((batch_size, max_boxes, description_length), jnp.int32))


def init_params(model: GrainModel, rng: jax.Array) -> Any:
    """``model.init``'s parameters (logically partitioned boxes), initialised on zero ``init_inputs(model)``.

    Parameter shapes and values do not depend on the input lengths or on whether descriptions are given
    (the text tower is the same module and initialisation folds the rng by module path), so this one
    init serves training, inference and conversion. Jit it with ``out_shardings`` to create them sharded.
    """
    inputs = [jnp.zeros(x.shape, x.dtype) for x in init_inputs(model)]
    return model.init({"params": rng}, *inputs)["params"]


def abstract_params(model: GrainModel) -> Any:
    """``jax.eval_shape`` of ``init_params``: the parameter tree as logically partitioned boxes of
    ``ShapeDtypeStruct``s, no allocation."""
    return jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))


def param_counts(model: GrainModel) -> dict[str, int]:
    """Number of parameters per top-level subtree (``image``, ``text``, ``decoder`` | ``image_projection``,
    ``logit_scale``), computed from shapes only."""
    params = abstract_params(model)
    return {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)) for name, tree in params.items()}


__all__ = ["GrainModel", "abstract_params", "create_model", "init_inputs", "init_params", "list_models",
           "param_counts"]
