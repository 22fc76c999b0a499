"""Save-time digests of every checkpointed array, verified on restore.

Orbax/tensorstore checksum their b-tree nodes but not the array bytes: one flipped bit in
a ``params`` or ``opt_state`` data file restores silently as a different weight. So each
training checkpoint carries an ``integrity`` item (JSON): for every array of ``params``,
``opt_state`` and ``extra`` a 128-bit digest of its bits, and the restore recomputes the
digests of what it read and refuses the step on any mismatch, naming the arrays.

The digest of an array of 32-bit words w_i (smaller elements widened, 8-byte ones split in
two; i the flat C-order index) is the pair of sums modulo 2^64 (Fletcher's checksum, with
64-bit sums of 32-bit words):

    S = sum_i w_i        P = sum_i i * w_i

A change of one word changes S (|change| < 2^32); two changes that cancel in S, d and -d at
i and j, change P by d * (i - j), not a multiple of 2^64: so any change of one or two words
(every 1- and 2-bit flip, any swap of two values) is detected for certain, and a larger
corruption is missed only if both 64-bit sums happen to come out equal. The sums are exact
and linear, so the digest does not depend on the sharding: each process adds up the shards
it holds, and a checkpoint saved on one mesh verifies when restored onto another. And P needs
no per-element work: with the flat index i = sum_d k_d * stride_d, P = sum_d stride_d *
sum_k k * M_d[k], where M_d[k] is the sum of the words whose index along dimension d is k
(two passes over the array: the sums over dimension 0 and over all the others).

Where the passes run: arrays on accelerators on their devices (one jitted call per device
set, the small marginal sums come back to the host); arrays on the host (CPU devices, numpy)
in numpy, on zero-copy views, in a few threads: XLA's CPU backend does not vectorise these
integer reductions (numpy is about 5x faster, benchmarks/checkpoint_integrity.py).
"""
from __future__ import annotations

import functools
import os
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ITEM = "integrity"
CHECKED_ITEMS = ("params", "opt_state", "extra")
FORMAT = 2  # 1: two 32-bit sums (a hashed one), 8-byte values digested by their low 32 bits
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_MOD = 2 ** 64
_ROW = 1024  # words per row when a run of words is summed as a matrix
_SMALL = 1 << 14  # runs of fewer words are summed together (_segment_sums)


class IntegrityError(ValueError):
    """A restored array's bits differ from the digest recorded when it was saved."""


def _marginals(words) -> list:
    """For a numpy or jax array of words [n_0, ..., n_D]: [M_0 [n_0], ..., M_D [n_D]], M_d = the uint64
    sums over every dimension but d (two passes over ``words``; the rest works on the first sums)."""
    if words.ndim == 1:
        return [words.astype(np.uint64)]
    rest = words.sum(axis=0, dtype=np.uint64)  # [n_1, ..., n_D]
    first = words.sum(axis=tuple(range(1, words.ndim)), dtype=np.uint64)
    return [first] + [rest.sum(axis=tuple(a for a in range(rest.ndim) if a != d)) for d in range(rest.ndim)]


def _sums(marginals: list[np.ndarray], start: tuple[int, ...], shape: tuple[int, ...],
          base: int = 0) -> tuple[int, int]:
    """(S, P) modulo 2^64 of the block at ``start`` of an array of ``shape`` whose words have ``marginals``;
    ``base`` is added to every flat index."""
    # uint64 array arithmetic wraps modulo 2^64 (silently, unlike numpy scalars'); the rest is Python integers
    total = int(marginals[0].sum(dtype=np.uint64))
    weighted = base * total
    for dim, sums in enumerate(marginals):
        positions = np.arange(start[dim], start[dim] + len(sums), dtype=np.uint64)
        weighted += int(np.prod(shape[dim + 1:], dtype=object)) * int((positions * sums).sum(dtype=np.uint64))
    return total, weighted % _MOD


def _word_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """The shape of an array's words: 8-byte elements add a trailing dimension of 2; a scalar is [1]."""
    shape = (*shape, 2) if itemsize == 8 else shape
    return shape or (1,)


# On devices: one jitted call over a list of arrays.

def _device_words(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = jnp.uint32 if x.dtype.itemsize == 8 else _UNSIGNED[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return words.reshape(_word_shape(x.shape, x.dtype.itemsize)) if x.ndim == 0 else words


@functools.lru_cache(maxsize=None)
def _device_marginals_fn(mesh: Mesh | None):
    """jit of all marginals of a list of arrays, concatenated into one uint64 vector (one transfer); on a
    mesh replicated, so every process reads it from its own devices. Call with 64-bit types enabled."""
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda leaves: jnp.concatenate([m for x in leaves for m in _marginals(_device_words(x))]),
                   out_shardings=out)


def _device_sums(leaves: list[jax.Array], mesh: Mesh | None) -> list[tuple[int, int]]:
    with jax.enable_x64(True):
        flat = np.asarray(_device_marginals_fn(mesh)(leaves).addressable_data(0))
    result, offset = [], 0
    for x in leaves:
        shape = _word_shape(x.shape, x.dtype.itemsize)
        marginals = []
        for n in shape:
            marginals.append(flat[offset:offset + n])
            offset += n
        result.append(_sums(marginals, (0,) * len(shape), shape))
    return result


# On the host: numpy over the blocks this process holds.

def _host_blocks(x: Any) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """(words, start in the array's words) of each block of ``x`` this process digests: across processes,
    every element once."""
    if isinstance(x, jax.Array):
        blocks = [(np.asarray(shard.data), tuple(s.start or 0 for s in shard.index))
                  for shard in x.addressable_shards if shard.replica_id == 0]
    else:
        blocks = [(np.asarray(x), (0,) * np.ndim(x))]
    words = []
    for value, start in blocks:
        value = np.asarray(value, order="C")
        if value.dtype.itemsize == 8:
            value, start = value[..., None].view(np.uint32), (*start, 0)
        else:
            value = value.view(_UNSIGNED[value.dtype.itemsize])
        words.append((value.reshape(value.shape or (1,)), start or (0,)))
    return words


def _segment_sums(segments: list[tuple[np.ndarray, int]]) -> list[tuple[int, int]]:
    """(S, P) of short runs of words [(flat words, flat index of the first)], all in a few numpy calls
    (a call per small array would cost more than summing it). Each run holds at least one word."""
    if not segments:
        return []
    starts = np.cumsum([0] + [words.size for words, _ in segments[:-1]], dtype=np.uint64)
    words = np.concatenate([words for words, _ in segments]).astype(np.uint64)
    totals = np.add.reduceat(words, starts.astype(np.intp))
    local = np.arange(len(words), dtype=np.uint64) - np.repeat(starts, [w.size for w, _ in segments])
    weighted = np.add.reduceat(words * local, starts.astype(np.intp))
    return [(int(t), (int(w) + base * int(t)) % _MOD) for t, w, (_, base) in zip(totals, weighted, segments)]


def _host_sums(leaves: list[Any]) -> list[tuple[int, int]]:
    """The digests of host-resident leaves.

    A block that is one run of the array's flat order (unsharded, or split along dimension 0) is summed
    as a [rows, _ROW] matrix (long rows keep numpy's reductions fast whatever the array's shape), its
    remainder and small blocks together by ``_segment_sums``; other blocks dimension by dimension. The
    large ones are spread over a few threads (numpy releases the GIL).
    """
    shapes = [_word_shape(np.shape(x), np.dtype(x.dtype).itemsize) for x in leaves]
    matrices, segments = [], []  # (leaf, [rows, _ROW] words or block, start, shape, base); (leaf, flat, base)
    for i, x in enumerate(leaves):
        for words, start in _host_blocks(x):
            if words.shape[1:] != shapes[i][1:]:
                matrices.append((i, words, start, shapes[i], 0))
                continue
            flat, base = words.reshape(-1), start[0] * int(np.prod(shapes[i][1:], dtype=object))
            rows = flat.size // _ROW if flat.size >= _SMALL else 0
            if rows:
                matrices.append((i, flat[:rows * _ROW].reshape(rows, _ROW), (0, 0), (rows, _ROW), base))
            if flat.size > rows * _ROW:
                segments.append((i, flat[rows * _ROW:], base + rows * _ROW))
    partial = np.zeros((len(leaves), 2), np.uint64)
    for (i, _, _), sums in zip(segments, _segment_sums([(flat, base) for _, flat, base in segments])):
        partial[i] += np.array(sums, np.uint64)
    with futures.ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
        done = pool.map(lambda m: _sums(_marginals(m[1]), *m[2:]), matrices)
        for (i, *_), sums in zip(matrices, done):
            partial[i] += np.array(sums, np.uint64)
    distributed = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if distributed:  # the other processes hold the rest of these arrays' blocks (gathered as uint32: no x64 needed)
        gathered = multihost_utils.process_allgather(partial[distributed].view(np.uint32))
        partial[distributed] = gathered.view(np.uint64).sum(axis=0, dtype=np.uint64)
    return [(int(total), int(weighted)) for total, weighted in partial]


def _on_host(x: Any) -> bool:
    return not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.sharding.device_set)


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def digests(items: dict[str, Any]) -> dict:
    """``{"format": FORMAT, item: {array path: "hex digest"}}`` for ``{item: pytree of arrays}``."""
    paths_and_leaves = [(name, path, leaf) for name, tree in items.items()
                        for path, leaf in zip(_paths(tree), jax.tree.leaves(tree))]
    leaves = [jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
              for _, _, leaf in paths_and_leaves]
    values: list[Any] = [None] * len(leaves)
    host = [i for i, leaf in enumerate(leaves) if _on_host(leaf)]
    for i, sums in zip(host, _host_sums([leaves[i] for i in host])):
        values[i] = sums
    groups: dict[tuple, list[int]] = {}  # one jitted call per device set (a call may not mix them)
    for i, leaf in enumerate(leaves):
        if values[i] is None:
            mesh = leaf.sharding.mesh if isinstance(leaf.sharding, NamedSharding) else None
            groups.setdefault((tuple(sorted(d.id for d in leaf.sharding.device_set)), mesh), []).append(i)
    for (_, mesh), indices in groups.items():
        for i, sums in zip(indices, _device_sums([leaves[i] for i in indices], mesh)):
            values[i] = sums
    record: dict[str, Any] = {"format": FORMAT, **{name: {} for name in items}}
    for (name, path, _), (total, weighted) in zip(paths_and_leaves, values):
        record[name][path] = f"{total:016x}{weighted:016x}"
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
