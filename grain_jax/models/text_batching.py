"""Static-shape helpers that let the text tower skip work which cannot change the result.

* Packing: of the B x M description slots only the valid ones (non-zero tokens) are encoded, packed
  into a fixed ``capacity`` of rows; the embeddings are scattered back to their slots afterwards.
* Length buckets: with the causal mask and EOT pooling, tokens after the last EOT of a batch never
  reach an embedding, so the batch is encoded at the shortest static length (bucket) that holds it.

Both choose among static shapes inside the jitted step (``nn.cond`` / ``nn.switch`` in the model), so
the step compiles once and a batch that does not fit simply takes the full-size branch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def description_capacity(num_slots: int, budget: float) -> int:
    """Rows encoded for ``num_slots`` description slots at ``budget`` (fraction of slots, in (0, 1]).

    Rounded up to a multiple of 8 (an even split over data-parallel devices), at most ``num_slots``.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"description_budget must be in (0, 1], got {budget}")
    return min(num_slots, 8 * math.ceil(budget * num_slots / 8))


def valid_rows(tokens: jax.Array) -> jax.Array:
    """tokens [N, L] -> [N] bool: rows holding a text (padding slots are all zero)."""
    return jnp.any(tokens != 0, axis=-1)


def pack(tokens: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """tokens [N, L] -> (packed [capacity, L], index [capacity]): valid rows first, in order.

    ``index[c]`` is the slot of packed row c; unused rows are all zero with index N (dropped by
    :func:`unpack`). Rows beyond ``capacity`` are not packed: the caller checks the count first.
    """
    num_slots = tokens.shape[0]
    (index,) = jnp.nonzero(valid_rows(tokens), size=capacity, fill_value=num_slots)
    packed = jnp.take(tokens, index, axis=0, mode="fill", fill_value=0)
    return packed, index


def unpack(embeddings: jax.Array, index: jax.Array, num_slots: int) -> jax.Array:
    """embeddings [capacity, E] of packed rows -> [num_slots, E], zero in slots no row came from."""
    out = jnp.zeros((num_slots,) + embeddings.shape[1:], embeddings.dtype)
    return out.at[index].set(embeddings, mode="drop")


def bucket_lengths(buckets: Sequence[int], length: int) -> tuple[int, ...]:
    """The static lengths to choose from for texts of padded length ``length``: buckets below it, then it."""
    if any(b < 2 for b in buckets):
        raise ValueError(f"text_length_buckets must be lengths >= 2 (SOT and EOT), got {tuple(buckets)}")
    return tuple(sorted({b for b in buckets if b < length})) + (length,)


def bucket_index(tokens: jax.Array, lengths: Sequence[int]) -> jax.Array:
    """tokens [N, L] -> int32 []: the first of ``lengths`` that holds every row up to its EOT (the max id)."""
    needed = jnp.max(jnp.argmax(tokens, axis=-1)) + 1
    return jnp.searchsorted(jnp.asarray(lengths, jnp.int32), needed.astype(jnp.int32)).astype(jnp.int32)
