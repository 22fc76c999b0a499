"""Save-time digests of every checkpointed array, verified on restore.

Orbax/tensorstore checksum their b-tree nodes but not the array bytes: one flipped bit in
a ``params`` or ``opt_state`` data file restores silently as a different weight. So each
training checkpoint carries an ``integrity`` item (JSON): for every array of ``params``,
``opt_state`` and ``extra`` a 64-bit digest of its bits, and the restore recomputes the
digests of what it read and refuses the step on any mismatch, naming the arrays.

The digest is two 32-bit sums over the array's elements, reinterpreted as unsigned
integers: the plain sum (any single flipped bit changes it) and the sum of a per-element
hash of (bits, flat index) (catches flips that cancel in the plain sum, moved or swapped values). Integer sums wrap
exactly in any order, so the digest does not depend on the sharding: it is computed
where the arrays already live (one fused pass over each array per save, not per step)
and only the 8 bytes per array come back to the host; a checkpoint saved on one mesh
verifies when restored onto another.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ITEM = "integrity"
CHECKED_ITEMS = ("params", "opt_state", "extra")
FORMAT = 1
_GOLDEN = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: spreads consecutive indices


class IntegrityError(ValueError):
    """A restored array's bits differ from the digest recorded when it was saved."""


def _bits(x: jax.Array) -> jax.Array:
    """The element bits as uint32 (same shape)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    """[2] uint32 digest of one array (see module docstring)."""
    bits = _bits(jnp.asarray(x))
    index = jnp.zeros(bits.shape, jnp.uint32)  # flat index, built per dimension (no reshape of a sharded array)
    for dim in range(bits.ndim):
        stride = np.uint32(int(np.prod(bits.shape[dim + 1:], dtype=np.uint64)) & 0xFFFFFFFF)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * stride
    # murmur3's 32-bit finaliser of (bits ^ position): every input bit affects every output bit,
    # so flips that cancel in the plain sum, or moved and swapped values, still change this sum.
    mixed = bits ^ (index * _GOLDEN)
    mixed = (mixed ^ (mixed >> 16)) * np.uint32(0x85EBCA6B)
    mixed = (mixed ^ (mixed >> 13)) * np.uint32(0xC2B2AE35)
    mixed = mixed ^ (mixed >> 16)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _digests_fn(mesh: Mesh | None):
    """jit of the digests of a list of arrays; on a mesh the [2] results are replicated, so every
    process can read them from its own devices."""
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda leaves: jnp.stack([_digest(x) for x in leaves]), out_shardings=out)


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _group(x: Any) -> tuple:
    """``(device ids, mesh or None)``, or ``()`` for host arrays: arrays of one group are digested by one
    jitted call (a call may not mix device sets)."""
    if not isinstance(x, jax.Array):
        return ()
    mesh = x.sharding.mesh if isinstance(x.sharding, NamedSharding) else None
    return tuple(sorted(d.id for d in x.sharding.device_set)), mesh


def digests(items: dict[str, Any]) -> dict:
    """``{"format": 1, item: {array path: "hex digest"}}`` for ``{item: pytree of arrays}``."""
    paths_and_leaves = [(name, path, leaf) for name, tree in items.items()
                        for path, leaf in zip(_paths(tree), jax.tree.leaves(tree))]
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, leaf) in enumerate(paths_and_leaves):
        groups.setdefault(_group(leaf), []).append(i)
    values: list[Any] = [None] * len(paths_and_leaves)
    for key, indices in groups.items():
        mesh = key[1] if key else None
        stacked = _digests_fn(mesh)([paths_and_leaves[i][2] for i in indices])  # [n, 2]: one transfer
        for i, d in zip(indices, np.asarray(stacked.addressable_data(0))):
            values[i] = d
    record: dict[str, Any] = {"format": FORMAT, **{name: {} for name in items}}
    for (name, path, _), d in zip(paths_and_leaves, values):
        record[name][path] = f"{int(d[0]):08x}{int(d[1]):08x}"
    return record


def verify(record: dict, items: dict[str, Any], step: int) -> bool:
    """Raises ``IntegrityError`` naming every array of ``items`` whose digest differs from ``record``.

    Returns False (nothing checked) for a record of another format, e.g. from a newer version.
    """
    if record.get("format") != FORMAT:
        return False
    actual = digests(items)
    bad = []
    for name in items:
        saved, now = record.get(name, {}), actual[name]
        bad += [f"{name}/{path}" for path in now if saved.get(path) != now[path]]
        bad += [f"{name}/{path} (not restored)" for path in saved if path not in now]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise IntegrityError(f"checkpoint step {step} is corrupt: {shown} differ from the digest recorded at save "
                             "time (the data files changed after they were written)")
    return True
