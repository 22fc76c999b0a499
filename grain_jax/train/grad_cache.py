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
is a second forward pass.

The parameter gradients are reduced over the data-parallel devices once per step,
not once per micro-batch: both passes run each micro-batch as G groups in a
``jax.shard_map`` that is manual over the batch's mesh axes that no parameter is
sharded over (``"data"`` by default; G = their size) and leaves the others to the
partitioner. The scan accumulates a [G, ...] gradient whose group g never leaves
its devices, and the sum over G after the scan is the one all-reduce (the compiled
HLO has no collective of float data inside the loops, tests/test_grad_cache.py).
Over the axes that shard the parameters (``"fsdp"``, ``"tensor"``), each group's accumulator is sharded
like the parameters (``param_axes``), so every micro-batch's weight gradients are reduce-scattered into it.
Deferring that reduction would hold the whole fp32 gradient on every device, which is what FSDP avoids;
left to itself, the partitioner did exactly that (benchmarks/grad_cache_fsdp.py). (``jax.vmap`` with
``spmd_axis_name`` would express the groups too, but its batched patch-embedding
convolution made the partitioner all-gather each micro-batch's images.) Group g of micro-batch j uses the dropout key
``fold_in(fold_in(rng, j), g)`` in both passes, so the recomputed forward is the one
whose outputs were cached.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from grain_jax import sharding

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


def _batch_first(outputs: Mapping[str, jax.Array], inverse: bool = False) -> dict[str, jax.Array]:
    """Cached outputs with their batch axis moved to the front (``inverse``: back)."""
    return {key: jnp.moveaxis(value, *((0, _BATCH_AXIS.get(key, 0)) if inverse else (_BATCH_AXIS.get(key, 0), 0)))
            for key, value in outputs.items()}


def _without(axes: Any, dropped: tuple[str, ...]) -> Any:
    """A rule's mesh axes (None, a name or a tuple) less ``dropped``."""
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in dropped)
    return kept[0] if len(kept) == 1 else (kept or None)


def _gradient_groups() -> tuple[tuple[str, ...], int, tuple]:
    """(mesh axes, their size G, the logical rules within a group) of the active mesh and rules: the batch's
    mesh axes that no other logical axis (so no parameter) maps to."""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return (), 1, rules
    others = {axis for name, _ in rules if name != "batch" for axis in sharding.mesh_axes(name, mesh)}
    axes = tuple(axis for axis in sharding.mesh_axes("batch", mesh) if axis not in others)
    inner_rules = tuple((name, _without(mesh_axes, axes)) for name, mesh_axes in rules)
    return axes, int(np.prod([mesh.shape[axis] for axis in axes], dtype=int)), inner_rules


def _per_group(fn: Callable, axes: tuple[str, ...], inner_rules: tuple) -> Callable:
    """``fn(key, params, *rows)`` on each group's rows, on the group's devices (``jax.shard_map``, manual over
    ``axes`` only), with group g's key ``fold_in(key, g)``; every leaf of ``rows`` and of the result has its batch
    axis first."""
    def in_group(key, p, *rows):
        with nn.logical_axis_rules(inner_rules):  # the group's rows are not split over ``axes`` again
            return fn(jax.random.fold_in(key, jax.lax.axis_index(axes)), p, *rows)

    if not axes:
        return lambda key, p, *rows: fn(jax.random.fold_in(key, 0), p, *rows)
    return lambda key, p, *rows: jax.shard_map(
        in_group, in_specs=(P(), P()) + (P(axes),) * len(rows), out_specs=P(axes), axis_names=set(axes))(key, p, *rows)


def _cached(outputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {key: value for key, value in outputs.items() if key in CACHED_OUTPUTS}


def make_gradient_fn(apply_fn: Callable[[Any, dict, jax.Array], Mapping[str, jax.Array]],
                     loss_fn: Callable[[Mapping[str, jax.Array], dict], tuple[jax.Array, dict]],
                     k: int, param_axes: Any) -> Callable:
    """``gradients(params, batch, rng) -> ((loss, metrics), grads)`` accumulated over ``k`` micro-batches.

    Args:
      apply_fn: ``(params, batch, rng) -> outputs`` of the model (train mode).
      loss_fn: ``(outputs, batch) -> (loss, metrics)`` on the full batch.
      k: number of micro-batches; must divide the batch size.
      param_axes: the parameters' logical partition specs (``nn.get_partition_spec`` of the boxed
        parameters), which shard the gradient accumulators.
    """
    def gradients(params, batch, rng):
        axes, groups, inner_rules = _gradient_groups()

        micro = jax.tree.map(lambda x: split(x, k), batch)
        index = jnp.arange(k)

        def embed(xs):
            j, micro_batch = xs
            run = _per_group(lambda key, p, rows: _batch_first(_cached(apply_fn(jax.lax.stop_gradient(p), rows, key))),
                             axes, inner_rules)
            return _batch_first(run(jax.random.fold_in(rng, j), params, micro_batch), inverse=True)

        outputs = jax.lax.map(embed, (index, micro))
        outputs = {key: join(value, _BATCH_AXIS.get(key, 0)) for key, value in outputs.items()}

        def full_batch_loss(outputs, logit_scale):
            return loss_fn({**outputs, "logit_scale": logit_scale.astype(jnp.float32)}, batch)

        (loss, metrics), (d_outputs, d_logit_scale) = jax.value_and_grad(full_batch_loss, argnums=(0, 1),
                                                                         has_aux=True)(outputs,
                                                                                       params["logit_scale"])
        d_micro = {key: split(value, k, _BATCH_AXIS.get(key, 0)) for key, value in d_outputs.items()}

        def group_grads(key, p, rows, d_rows):
            """[1, ...] parameter gradients of this group's rows (not reduced over the groups)."""
            # Marked as varying over the groups: the gradient of an invariant input would be psum'ed right here.
            p = jax.lax.pcast(p, axes, to="varying")
            _, pull_back = jax.vjp(lambda p: _cached(apply_fn(p, rows, key)), p)
            return jax.tree.map(lambda g: g[None], pull_back(_batch_first(d_rows, inverse=True))[0])

        def accumulators(grads):
            """[G, ...] per-group gradient sums: group g on its devices, the rest sharded like the parameters."""
            if not axes:
                return grads
            return jax.tree.map(lambda g, spec: jax.lax.with_sharding_constraint(
                g, P(axes, *nn.logical_to_mesh_axes(spec or ()))), grads, param_axes)

        def backward(grads, xs):
            j, micro_batch, d_micro_outputs = xs
            micro_grads = _per_group(group_grads, axes, inner_rules)(jax.random.fold_in(rng, j), params, micro_batch,
                                                 _batch_first(d_micro_outputs))
            return accumulators(jax.tree.map(jnp.add, grads, micro_grads)), None

        zeros = accumulators(jax.tree.map(lambda p: jnp.zeros((groups,) + p.shape, p.dtype), params))
        grads, _ = jax.lax.scan(backward, zeros, (index, micro, d_micro))
        grads = jax.tree.map(lambda g: g.sum(axis=0), grads)  # the one all-reduce over ``axes``
        grads = {**grads, "logit_scale": grads["logit_scale"] + d_logit_scale}
        return (loss, metrics), grads

    return gradients


def make_fp32_reduced_gradient_fn(apply_fn: Callable[[Any, dict, jax.Array], Mapping[str, jax.Array]],
                                  loss_fn: Callable[[Mapping[str, jax.Array], dict], tuple[jax.Array, dict]]
                                  ) -> Callable:
    """``gradients(params, batch, rng) -> ((loss, metrics), grads)`` of one step on the whole batch, with the
    data-parallel reduction of the gradients in the parameters' dtype (fp32, ``config.grad_reduce_dtype``).

    Under the partitioner alone, a weight's gradient is all-reduced where it is computed, at the
    weight-gradient matmul, so in the compute dtype (bf16). Here the model runs as the G groups of
    ``_per_group`` with the parameters marked as varying over the groups before the model casts them: the
    transpose of that mark, the psum over the groups, then sums fp32 gradients, as the reference's
    DistributedDataParallel all-reduces fp32 ``.grad``. The loss still sees the whole batch (arguments as
    in ``make_gradient_fn``); group g's dropout key is ``fold_in(rng, g)``.
    """
    def gradients(params, batch, rng):
        axes, _, inner_rules = _gradient_groups()

        def group_outputs(key, p, rows):
            if axes:
                p = jax.lax.pcast(p, axes, to="varying")  # where the gradients will be psum'ed: still fp32 here
            return _batch_first(_cached(apply_fn(p, rows, key)))

        def loss(params):
            outputs = _batch_first(_per_group(group_outputs, axes, inner_rules)(rng, params, batch), inverse=True)
            return loss_fn({**outputs, "logit_scale": params["logit_scale"].astype(jnp.float32)}, batch)

        return jax.value_and_grad(loss, has_aux=True)(params)

    return gradients
