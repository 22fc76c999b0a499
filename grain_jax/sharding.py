"""Logical axis names and the mesh they map onto.

Every parameter in grain_jax is created with ``nn.with_logical_partitioning`` using
the names below, and key activations are constrained with
``nn.with_logical_constraint``. The physical mesh always has the three axes
``("data", "fsdp", "tensor")``; ``LOGICAL_AXIS_RULES`` says which mesh axis (if any)
each logical name is sharded over. A config can prepend its own rules
(``config.sharding_rules``) to override the defaults: the first match wins.

Every batch that goes on device (train step inputs, the input pipeline's global arrays,
evaluation and inference) is placed with ``batch_sharding(mesh, rules)``, so overriding the
``batch`` rule moves all of them together.

| logical name | used for                                          | mesh axis        |
|--------------|---------------------------------------------------|------------------|
| batch        | activation batch dim (images, texts)              | (data, fsdp)     |
| embed        | model width of *parameters* (FSDP / ZeRO-3 dim)   | fsdp             |
| mlp          | MLP hidden dim                                     | tensor           |
| heads        | attention heads                                    | tensor           |
| kv           | per-head dim                                       | replicated       |
| vocab        | token-embedding rows                               | tensor           |
| act_embed    | model width of *activations*                       | replicated       |
| seq          | tokens / patches / text positions / queries        | replicated       |
| norm         | LayerNorm scale and bias, scalars, tiny vectors    | replicated       |
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("act_embed", None),
    ("seq", None),
    ("norm", None),
)


def axis_rules(extra_rules: Sequence[Sequence] = ()) -> tuple:
    """Config rules first (they win), then the defaults."""
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in extra_rules) + LOGICAL_AXIS_RULES


def logical_mesh_axes(logical_name: str, rules: Sequence | None = None) -> tuple[str, ...]:
    """The mesh axes ``logical_name`` maps to under ``rules`` (None: the active flax rules, else the defaults)."""
    rules = rules if rules is not None else (nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES)
    spec = nn.logical_to_mesh_axes((logical_name,), tuple(rules))[0]
    return (spec,) if isinstance(spec, str) else tuple(spec or ())


def mesh_axes(logical_name: str, mesh, rules: Sequence | None = None) -> tuple[str, ...]:
    """The axes of ``mesh`` that ``logical_name`` maps to, e.g. ``("data", "fsdp")`` for "batch".

    ``rules``: full rules (``axis_rules(...)``); None = the active flax rules, else the defaults
    (for code that goes manual with ``jax.shard_map`` inside a ``nn.logical_axis_rules`` block).
    """
    return tuple(axis for axis in logical_mesh_axes(logical_name, rules) if axis in mesh.axis_names)


def batch_sharding(mesh: Mesh, rules: Sequence = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Leading (batch) dim over the ``batch`` logical axis (``("data", "fsdp")`` by default), the rest
    replicated. ``rules``: full rules (``axis_rules(config.sharding_rules)``)."""
    return nn.logical_to_mesh_sharding(PartitionSpec("batch"), mesh, tuple(rules))


def abstract_arrays(tree, shardings):
    """``jax.ShapeDtypeStruct``s of ``tree``'s leaves placed with ``shardings`` (a matching tree): the
    inputs of an ahead-of-time compile and the targets of a sharded restore, without allocating."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_shards(axis_sizes: Mapping[str, int], rules: Sequence = LOGICAL_AXIS_RULES) -> int:
    """How many ways ``batch_sharding`` splits a batch: the product of the batch axes' sizes.

    ``axis_sizes``: ``mesh.shape``, or ``{axis: size}`` of a mesh not built yet.
    """
    return int(np.prod([axis_sizes.get(axis, 1) for axis in logical_mesh_axes("batch", rules)]))


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single ``-1`` entry so the product equals ``num_devices``.

    >>> resolve_mesh_shape((-1, 2, 1), 8)
    (4, 2, 1)
    """
    shape = [int(s) for s in mesh_shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {tuple(mesh_shape)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape may contain at most one -1, got {tuple(mesh_shape)}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if known <= 0 or num_devices % known:
            raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {num_devices}")
    return tuple(shape)


def create_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), dcn_mesh_shape: Sequence[int] | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh.

    Args:
      mesh_shape: per-slice (ICI) shape; one entry may be -1 (fills the rest).
      dcn_mesh_shape: for multi-slice TPU: how many slices along each axis
        (e.g. ``(2, 1, 1)`` = data parallel across 2 slices). ``None`` = one slice.
      devices: defaults to ``jax.devices()``.
    """
    from jax.experimental import mesh_utils

    devices = list(devices if devices is not None else jax.devices())
    if dcn_mesh_shape is not None and int(np.prod(dcn_mesh_shape)) > 1:
        num_slices = int(np.prod(dcn_mesh_shape))
        ici = resolve_mesh_shape(mesh_shape, len(devices) // num_slices)
        device_array = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn_mesh_shape), devices)
    else:
        shape = resolve_mesh_shape(mesh_shape, len(devices))
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # CPU / odd topologies: plain row-major order is fine.
            device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def sharding_excess(tree, weight_axes: Sequence[str] = ("fsdp", "tensor")) -> tuple[float, list[tuple[str, int]]]:
    """How far the arrays of ``tree`` (each with a ``NamedSharding``) are from fully sharded weights.

    MaxText's ``assert_params_sufficiently_sharded`` idea: over the ``weight_axes`` (the data axis
    replicates by design), the ideal bytes per device are total / (their size); the excess is
    ``bytes per device / ideal - 1`` (0 = fully sharded). LayerNorms, biases and other small
    leaves stay replicated, so a few percent is normal.

    Returns:
      ``(excess, [(path, replicated bytes per device), ...])``, largest replicated leaves first.
    """
    total = per_device = 0
    replicated = []
    weight_devices = 1
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        shard_bytes = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        mesh_shape = dict(leaf.sharding.mesh.shape)
        weight_devices = int(np.prod([mesh_shape.get(axis, 1) for axis in weight_axes]))
        total, per_device = total + nbytes, per_device + shard_bytes
        if shard_bytes == nbytes and weight_devices > 1:
            replicated.append((jax.tree_util.keystr(path), shard_bytes))
    excess = per_device / (total / weight_devices) - 1 if total else 0.0
    return excess, sorted(replicated, key=lambda item: -item[1])
