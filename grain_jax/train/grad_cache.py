"""Gradient accumulation that keeps every negative of the global batch (GradCache, open_clip ``--accum-freq``).

With ``grad_accum_steps = k`` the global batch is cut into k micro-batches, and one
optimizer step takes three passes:

1. embed: run the model on each micro-batch without gradients and keep everything
   the loss reads (``CACHED_OUTPUTS``: image, caption and description embeddings,
   region embeddings, boxes and per-layer boxes), reassembled into the full batch;
2. loss: ``total_loss`` on the full batch (all B negatives, Hungarian matching on
   every image) and its gradient with respect to those outputs and ``logit_scale``;
3. backward: run each micro-batch again, now under ``jax.vjp``, and pull the cached
   output gradients of its rows back to the parameters; the parameter gradients
   are summed over the micro-batches.

The loss and gradients are those of one step on the full batch (up to fp
rounding), while activations are only ever alive for one micro-batch; the price
is a second forward pass. Micro-batch j uses the dropout key ``fold_in(rng, j)``
in both passes, so the recomputed forward is the one whose outputs were cached.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

# Outputs that are not [B, ...]: where their batch axis is. ``logit_scale`` is a parameter, not cached.
_BATCH_AXIS = {"dec/layer_boxes": 1}
CACHED_OUTPUTS = ("img/embedding", "txt/caption", "txt/descriptions", "dec/region_embeddings", "dec/boxes",
                  "dec/layer_boxes")


def _constrain(x: jax.Array, batch_axis: int) -> jax.Array:
    axes = [None] * x.ndim
    axes[batch_axis] = "batch"
    return nn.with_logical_constraint(x, tuple(axes))


def split(x: jax.Array, k: int, batch_axis: int = 0) -> jax.Array:
    """Batch axis B -> [k, ..., B/k, ...]; micro-batch j = rows j, j+k, ... so each device keeps its share."""
    x = jnp.moveaxis(x, batch_axis, 0)
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    return _constrain(jnp.moveaxis(x, 1, batch_axis + 1), batch_axis + 1)


def join(x: jax.Array, batch_axis: int = 0) -> jax.Array:
    """Inverse of ``split``: [k, ..., B/k, ...] -> batch axis B in the original row order."""
    x = jnp.moveaxis(x, batch_axis + 1, 0)       # [B/k, k, ...]
    x = x.reshape((-1,) + x.shape[2:])
    return _constrain(jnp.moveaxis(x, 0, batch_axis), batch_axis)


def make_gradient_fn(apply_fn: Callable[[Any, dict, jax.Array], Mapping[str, jax.Array]],
                     loss_fn: Callable[[Mapping[str, jax.Array], dict], tuple[jax.Array, dict]],
                     k: int) -> Callable:
    """``gradients(params, batch, rng) -> ((loss, metrics), grads)`` accumulated over ``k`` micro-batches.

    Args:
      apply_fn: ``(params, batch, rng) -> outputs`` of the model (train mode).
      loss_fn: ``(outputs, batch) -> (loss, metrics)`` on the full batch.
      k: number of micro-batches; must divide the batch size.
    """
    def cached(outputs):
        return {key: value for key, value in outputs.items() if key in CACHED_OUTPUTS}

    def gradients(params, batch, rng):
        micro = jax.tree.map(lambda x: split(x, k), batch)
        index = jnp.arange(k)

        def embed(xs):
            j, micro_batch = xs
            return cached(apply_fn(jax.lax.stop_gradient(params), micro_batch, jax.random.fold_in(rng, j)))

        outputs = jax.lax.map(embed, (index, micro))
        outputs = {key: join(value, _BATCH_AXIS.get(key, 0)) for key, value in outputs.items()}

        def full_batch_loss(outputs, logit_scale):
            return loss_fn({**outputs, "logit_scale": logit_scale.astype(jnp.float32)}, batch)

        (loss, metrics), (d_outputs, d_logit_scale) = jax.value_and_grad(full_batch_loss, argnums=(0, 1),
                                                                         has_aux=True)(outputs,
                                                                                       params["logit_scale"])
        d_micro = {key: split(value, k, _BATCH_AXIS.get(key, 0)) for key, value in d_outputs.items()}

        def backward(grads, xs):
            j, micro_batch, d_micro_outputs = xs
            _, pull_back = jax.vjp(lambda p: cached(apply_fn(p, micro_batch, jax.random.fold_in(rng, j))), params)
            (micro_grads,) = pull_back(d_micro_outputs)
            return jax.tree.map(jnp.add, grads, micro_grads), None

        grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params), (index, micro, d_micro))
        grads = {**grads, "logit_scale": grads["logit_scale"] + d_logit_scale}
        return (loss, metrics), grads

    return gradients
