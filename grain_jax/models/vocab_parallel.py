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

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax.sharding import PartitionSpec as P

from grain_jax import sharding


def _local_lookup(table: jax.Array, tokens: jax.Array, vocab_axes: tuple[str, ...]) -> jax.Array:
    """Inside shard_map: this shard's rows [V/T, W], ids [n, L] -> its part of the embeddings, summed over shards."""
    rows_per_shard = table.shape[0]
    local = tokens - jax.lax.axis_index(vocab_axes) * rows_per_shard
    mine = (local >= 0) & (local < rows_per_shard)
    embedded = jnp.take(table, jnp.where(mine, local, 0), axis=0)
    return jax.lax.psum(jnp.where(mine[..., None], embedded, 0), vocab_axes)


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
    token_spec = P(batch_axes) if tokens.shape[0] % batch_shards == 0 else P()
    fn = jax.shard_map(lambda t, ids: _local_lookup(t, ids, vocab_axes), in_specs=(P(vocab_axes), token_spec),
                       out_specs=token_spec)
    return fn(table, tokens)


class VocabParallelEmbed(nn.Embed):
    """``nn.Embed`` (same parameter) whose lookup is ``lookup`` above."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {inputs.dtype}")
        (embedding,) = promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        return lookup(embedding, inputs)
