"""Ring contrastive statistics: ``shard_map`` + ``ppermute`` over the batch axes of the mesh.

Each device keeps its own rows and passes its columns (with their validity,
global index and negative group) around a ring of devices; at every hop it
folds the visiting block into a streaming log-sum-exp (``blockwise.combine``).
After P - 1 hops every row has seen every column. The backward pass (a custom
VJP) walks the ring again: the visiting block carries its own gradient
accumulator with it and one last hop brings that gradient home. Peak memory per
device is one [N/P, C/P] block plus a few [C/P, D] buffers, in both passes, and
nothing of size [N, C] or [C, D] is ever gathered (the dense loss gathers all
columns and holds [N/P, C] logits, several copies of them in the backward pass).

With per-device negatives (G groups), a device only needs the columns of its
own group: when G is a multiple of P no hop is made at all, when P is a
multiple of G the ring is the P/G devices of the group; otherwise every device
is visited and the group mask does the rest.

Outside a mesh (or on a single batch shard) this is one local block.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from grain_jax import sharding
from grain_jax.losses import blockwise


class _Ring(NamedTuple):
    """Static description of the ring: mesh axes it runs over, hops per lap, and the ppermute pairs."""
    axes: tuple[str, ...]
    size: int
    perm: tuple[tuple[int, int], ...]


def _make_ring(axes: tuple[str, ...], num_shards: int, num_groups: int) -> _Ring:
    """Sub-rings of ``size`` consecutive batch shards (shard i sends to the next one of its sub-ring)."""
    if num_groups % num_shards == 0:
        size = 1
    elif num_shards % num_groups == 0:
        size = num_shards // num_groups
    else:
        size = num_shards
    perm = tuple((i, i // size * size + (i % size + 1) % size) for i in range(num_shards))
    return _Ring(axes, size, perm)


def _around_the_ring(ring: _Ring, block, acc, visit):
    """``visit(block, acc) -> (block, acc)`` on the local block, then on each of the ``size - 1`` others."""
    block, acc = visit(block, acc)
    if ring.size == 1:
        return block, acc

    def hop(carry, _):
        block, acc = carry
        return visit(jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axes, ring.perm), block), acc), None

    (block, acc), _ = jax.lax.scan(hop, (block, acc), length=ring.size - 1)
    return block, acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_statistics(ring: _Ring, rows, cols, col_valid, labels, col_index, row_group, col_group, scale):
    """Per-device ``RowStats`` of the local rows [n, D] against the columns of the whole (sub-)ring."""
    return _forward(ring, rows, cols, col_valid, labels, col_index, row_group, col_group, scale)[0]


def _forward(ring, rows, cols, col_valid, labels, col_index, row_group, col_group, scale):
    def visit(block, stats):
        block_cols, block_valid, block_index, block_group = block
        return block, blockwise.combine(stats, blockwise.block_statistics(
            rows, block_cols, block_valid, labels, block_index, row_group, block_group, scale))

    empty = jnp.full(labels.shape, -jnp.inf, jnp.float32)  # statistics over no column
    _, stats = _around_the_ring(ring, (cols, col_valid, col_index, col_group), blockwise.RowStats(empty, empty, empty),
                                visit)
    return stats, (rows, cols, col_valid, col_index, row_group, col_group, scale, stats.lse)


def _backward(ring, residuals, cotangents):
    rows, cols, col_valid, col_index, row_group, col_group, scale, lse = residuals
    g = cotangents.lse  # best_before / best_after only feed comparisons: no gradient

    def visit(block, acc):
        block_cols, block_valid, block_index, block_group, block_grad = block
        d_rows, d_scale = acc
        logits, allowed = blockwise.block_logits(rows, block_cols, block_valid, row_group, block_group, scale)
        d_logits = jnp.where(allowed, g[:, None] * jnp.exp(logits - lse[:, None]), 0.0)     # [n, c]
        d_dots = d_logits * scale[:, None]                                                  # d / d(rows @ cols.T)
        d_rows = d_rows + jnp.einsum("nc,cd->nd", d_dots, block_cols, precision=blockwise.PRECISION)
        block_grad = block_grad + jnp.einsum("nc,nd->cd", d_dots, rows, precision=blockwise.PRECISION)
        # logits = scale * dots where allowed, so d scale_n = sum_c d_logits * logits / scale.
        d_scale = d_scale + jnp.sum(jnp.where(allowed, d_logits * logits, 0.0), axis=-1) / scale
        return (block_cols, block_valid, block_index, block_group, block_grad), (d_rows, d_scale)

    block = (cols, col_valid, col_index, col_group, jnp.zeros_like(cols))
    block, (d_rows, d_scale) = _around_the_ring(ring, block, (jnp.zeros_like(rows), jnp.zeros_like(scale)), visit)
    d_cols = block[-1]
    if ring.size > 1:  # the block is size - 1 hops from home: one more hop returns its gradient
        d_cols = jax.lax.ppermute(d_cols, ring.axes, ring.perm)
    return d_rows, d_cols, None, None, None, None, None, d_scale


_ring_statistics.defvjp(_forward, _backward)


def row_statistics(rows: jax.Array, cols: jax.Array, col_valid: jax.Array, labels: jax.Array,
                   row_group: jax.Array, col_group: jax.Array, scale: jax.Array, *,
                   num_groups: int = 1) -> blockwise.RowStats:
    """``blockwise.RowStatistics`` around a ring of the current mesh's batch shards (``jax.set_mesh``).

    ``num_groups``: number of contiguous negative groups in ``row_group`` / ``col_group``
    (only used to skip hops that could never meet a column of the row's group).
    """
    col_index = jnp.arange(cols.shape[0], dtype=jnp.int32)
    args = (rows, cols, col_valid, labels, col_index, row_group, col_group, scale)
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else sharding.mesh_axes("batch", mesh)
    num_shards = int(np.prod([mesh.shape[axis] for axis in axes])) if axes else 1
    if num_shards == 1:
        return _ring_statistics(_Ring((), 1, ()), *args)
    if rows.shape[0] % num_shards or cols.shape[0] % num_shards:
        raise ValueError(f"loss.contrastive_impl='ring' needs the contrastive rows ({rows.shape[0]}) and columns "
                         f"({cols.shape[0]}) to divide evenly over the {num_shards} batch shards {axes}")
    ring = _make_ring(axes, num_shards, num_groups)
    spec = P(axes)
    fn = jax.shard_map(functools.partial(_ring_statistics, ring), in_specs=(spec,) * len(args),
                       out_specs=blockwise.RowStats(spec, spec, spec), check_vma=False)
    return fn(*args)
