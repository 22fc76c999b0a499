"""Token-embedding lookup for a vocabulary sharded over the tensor axis (Megatron's VocabParallelEmbedding).

``jnp.take`` on a table whose rows are sharded makes GSPMD fall back to full
rematerialisation: it all-gathers the token ids and the looked-up [N, L, W]
activations of the *whole* batch onto every device (measured in the compiled HLO
on a (2, 2, 2) mesh, see tests/test_vocab_parallel.py). Here each tensor shard
looks up the ids that fall in its own rows (zeros elsewhere) for its own batch
rows only, and one all-reduce over the tensor axis adds the shards' parts: the
collective is [N/batch_shards, L, W], like any tensor-parallel layer's output.
A one-hot matmul would avoid the gather too, but materialises an
[N/batch_shards, L, V/tensor] one-hot (about 2 GiB per device for a 32k batch of
77-token captions), so it is not used.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax.sharding import PartitionSpec as P

from grain_jax import sharding


def _local_lookup(table: jax.Array, tokens: jax.Array, vocab_axes: tuple[str, ...]) -> jax.Array:
    """Inside shard_map: this shard's rows [V/T, W], ids [n, L] -> its part of the embeddings, summed over shards."""
    local, mine = _local_ids(tokens, table.shape[0], vocab_axes)
    embedded = jnp.take(table, local, axis=0)
    return jax.lax.psum(jnp.where(mine[..., None], embedded, 0), vocab_axes)


def _local_ids(tokens: jax.Array, rows_per_shard: int, vocab_axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map: (row of each id in this shard's rows, 0 for others [n, L]; whether it is in them)."""
    local = tokens - jax.lax.axis_index(vocab_axes) * rows_per_shard
    mine = (local >= 0) & (local < rows_per_shard)
    return jnp.where(mine, local, 0), mine


def lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table [V, W] (rows on the logical "vocab" axis), tokens [N, L] int -> [N, L, W].

    Outside a mesh, or when the vocabulary is not sharded, this is ``jnp.take``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    vocab_axes = () if mesh.empty else sharding.mesh_axes("vocab", mesh)
    vocab_shards = int(np.prod([mesh.shape[axis] for axis in vocab_axes])) if vocab_axes else 1
    if vocab_shards == 1 or table.shape[0] % vocab_shards:
        return jnp.take(table, tokens, axis=0)
    batch_axes = sharding.mesh_axes("batch", mesh)
    batch_shards = int(np.prod([mesh.shape[axis] for axis in batch_axes])) if batch_axes else 1
    return _sharded_lookup(table, tokens, vocab_axes, batch_axes if tokens.shape[0] % batch_shards == 0 else ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sharded_lookup(table: jax.Array, tokens: jax.Array, vocab_axes: tuple[str, ...],
                    batch_axes: tuple[str, ...]) -> jax.Array:
    """``lookup`` on a sharded vocabulary, ``tokens`` split over ``batch_axes``.

    The backward pass is written out (a scatter-add into each shard's rows, summed over the batch shards)
    rather than derived: JAX cannot differentiate a shard_map nested in another one that is manual over
    other axes (``grad_cache``'s groups), as it names the outer axes in the inner one's residuals.
    """
    return jax.shard_map(lambda t, ids: _local_lookup(t, ids, vocab_axes), in_specs=(P(vocab_axes), P(batch_axes)),
                         out_specs=P(batch_axes))(table, tokens)


def _sharded_lookup_fwd(table, tokens, vocab_axes, batch_axes):
    return _sharded_lookup(table, tokens, vocab_axes, batch_axes), (tokens, jnp.zeros((0,) + table.shape, table.dtype))


def _sharded_lookup_bwd(vocab_axes, batch_axes, residuals, d_embedded):
    tokens, table_like = residuals  # table_like [0, V, W]: the table's shape and dtype, no data
    rows_per_shard = table_like.shape[1] // int(np.prod([jax.sharding.get_abstract_mesh().shape[axis]
                                                         for axis in vocab_axes]))

    def local_gradient(ids, d_rows):  # this shard's rows [V/T, W], from this batch shard, summed over batch shards
        local, mine = _local_ids(ids, rows_per_shard, vocab_axes)
        d_table = jnp.zeros((rows_per_shard, d_rows.shape[-1]), d_rows.dtype)
        d_table = d_table.at[local].add(jnp.where(mine[..., None], d_rows, 0))
        return jax.lax.psum(d_table, batch_axes) if batch_axes else d_table

    d_table = jax.shard_map(local_gradient, in_specs=(P(batch_axes), P(batch_axes)),
                            out_specs=P(vocab_axes))(tokens, d_embedded)
    return d_table.astype(table_like.dtype), None


_sharded_lookup.defvjp(_sharded_lookup_fwd, _sharded_lookup_bwd)


class VocabParallelEmbed(nn.Embed):
    """``nn.Embed`` (same parameter) whose lookup is ``lookup`` above."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {inputs.dtype}")
        (embedding,) = promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        return lookup(embedding, inputs)
