"""Helpers that let the text tower skip work which cannot change the result.

* Packing (in the jitted step): of the B x M description slots only the valid ones (non-zero tokens)
  are encoded, packed into a fixed ``capacity`` of rows; the embeddings are scattered back to their slots
  afterwards. Whether a batch fits is decided on the host (:func:`fit_batch`): a batch with more valid
  descriptions runs the model with every slot (``description_budget=1``), another executable.
* Length buckets (on the host, ``config.data.text_length_buckets``): with the causal mask and EOT
  pooling, tokens after the last EOT of a batch never reach an embedding, so :func:`fit_texts` cuts a
  batch's token arrays to the shortest bucket that holds them before they go to the device, and the
  caller runs the step compiled for that length (one executable per length used).

Why not inside the step: under autodiff a ``switch`` (or ``cond``) keeps the residuals of every branch
(zeros for the ones not taken), so the step's temporaries are the sum over branches and every step writes
them all (docs/performance.md, "Length buckets" and "Packed descriptions").
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def description_capacity(num_slots: int, budget: float) -> int:
    """Rows encoded for ``num_slots`` description slots at ``budget`` (fraction of slots, in (0, 1]).

    Rounded up to a multiple of 8 (an even split over data-parallel devices), at most ``num_slots``.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"description_budget must be in (0, 1], got {budget}")
    return min(num_slots, 8 * math.ceil(budget * num_slots / 8))


def valid_rows(tokens: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """tokens [..., L] -> [...] bool: rows holding a text (padding slots are all zero); numpy stays on the host."""
    return (tokens != 0).any(axis=-1)


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


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """``config.data.text_length_buckets`` sorted without repeats; ValueError naming the key unless integers >= 2."""
    if isinstance(buckets, (str, bytes)) or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 2 for b in buckets):
        raise ValueError(f"config.data.text_length_buckets must be token lengths >= 2 (SOT and EOT), e.g. "
                         f"(16, 32, 48), got {buckets!r}")
    return tuple(sorted({int(b) for b in buckets}))


def needed_length(tokens: np.ndarray) -> int:
    """tokens [..., L] -> positions every row needs: up to its EOT (the row's max id, where the text tower
    pools), the longest over rows; all-zero (padding) rows need none."""
    rows = tokens.reshape(-1, tokens.shape[-1])
    return int(np.max(np.where(rows.any(axis=-1), rows.argmax(axis=-1) + 1, 0), initial=0))


def bucket_length(needed: int, buckets: Sequence[int], padded: int) -> int:
    """The shortest of ``buckets`` (sorted) that holds ``needed`` positions and is below ``padded``, else ``padded``."""
    return next((b for b in buckets if needed <= b < padded), padded)


def fit_batch(batch: Mapping[str, np.ndarray], buckets: Sequence[int], keys: Sequence[str],
              description_budget: float = 1.0) -> tuple[dict[str, np.ndarray], bool]:
    """(the host batch with each of its token arrays ``keys`` ([..., L]) cut to the bucket that holds it,
    whether its valid descriptions fit the packed rows of ``description_budget``).

    Every process gets the same answers (the longest need and the total count over processes, one
    all-gather), so the global batch has one shape and every process runs the same executable. No
    ``buckets``: the arrays as they are. When the descriptions do not fit (always True for budget 1, or
    when ``keys`` has no descriptions), the caller runs the model with every slot encoded.
    """
    buckets = check_buckets(buckets) if buckets else ()
    descriptions = "description_tokens" in keys and description_budget < 1
    needed = np.array([needed_length(batch[key]) for key in keys] if buckets else [], np.int32)
    valid = np.array([np.sum(valid_rows(batch["description_tokens"]))] if descriptions else [], np.int32)
    if jax.process_count() > 1 and (buckets or descriptions):
        gathered = multihost_utils.process_allgather(np.concatenate([needed, valid]))
        needed, valid = np.max(gathered[:, :len(needed)], axis=0), np.sum(gathered[:, len(needed):], axis=0)
    fits = True
    if descriptions:
        tokens = batch["description_tokens"]
        slots = tokens.shape[0] * tokens.shape[1] * jax.process_count()  # the global batch's B x M
        fits = int(valid[0]) <= description_capacity(slots, description_budget)
    fitted = {**batch, **{key: batch[key][..., :bucket_length(int(n), buckets, batch[key].shape[-1])]
                          for key, n in zip(keys, needed)}}
    return fitted, fits


def fit_texts(batch: Mapping[str, np.ndarray], buckets: Sequence[int], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The host batch with each of its token arrays ``keys`` ([..., L]) cut to the bucket that holds it
    (:func:`fit_batch` without the description budget)."""
    return fit_batch(batch, buckets, keys)[0]
