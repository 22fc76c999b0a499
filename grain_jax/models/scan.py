"""Scanned layer stacks (``scan_layers=True``) and the conversion between the two parameter layouts.

With ``scan_layers`` a tower's ``depth`` identical blocks run as one ``nn.scan``: XLA compiles one block
body instead of ``depth`` copies, so compile time stops growing with depth. The scanned parameters are
the unrolled ones stacked on a new leading axis (logical name "layers", never sharded):

| unrolled (reference / converter layout)       | scanned                                           |
|-----------------------------------------------|---------------------------------------------------|
| ``image/blocks_{i}/attn/qkv_kernel`` [W,3,H,Dh] | ``image/blocks/attn/qkv_kernel`` [depth,W,3,H,Dh] |
| ``text/blocks_{i}/...``                        | ``text/blocks/...``                               |
| ``decoder/layers_{i}/...``                     | ``decoder/layers/...``                            |

The converters always write the unrolled layout. Restoring converts whatever a checkpoint holds into the
model's layout (``checkpoints.restore_params``, hence ``inference.load``, and ``config.init_from``), so a
checkpoint of either layout loads into a model of either layout.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# "/"-joined paths of the stacks, as (parent module, block name).
STACKS = ("image/blocks", "text/blocks", "decoder/layers")
LAYERS_AXIS = "layers"


def scan_blocks(block: nn.Module, carry: jax.Array, *broadcast: jax.Array, length: int,
                collect: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """``carry = block(carry, *broadcast)`` ``length`` times, each time with its own slice of ``block``'s params.

    ``block``: an unbound block instance (its name is the scanned module's name, e.g. "blocks");
    ``broadcast``: inputs every step sees unchanged (the decoder's queries and memory).
    Returns ``(carry, ys)``: ys is [length, *carry.shape], every step's output, if ``collect`` else None.
    """
    def body(module, x, *args):
        x = module(x, *args)
        return x, (x if collect else None)

    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(broadcast), length=length,
                      metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    return scanned(block, carry, *broadcast)


def is_stacked_path(path: str) -> bool:
    """Whether a "/"-joined param path (e.g. "image/blocks/attn/qkv_kernel") lies in a scanned stack,
    i.e. its leaves carry the extra leading layers axis."""
    return any(path.startswith(stack + "/") for stack in STACKS)


# ----------------------------------------------------------------- leaves
def _shift_sharding(sharding: Any, stacked: bool) -> Any:
    """The sharding of the stacked (``stacked``) or per-layer leaf: the layers axis is never sharded."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding  # single-device (or None): fits any shape
    spec = tuple(sharding.spec)
    spec = (None,) + spec if stacked else spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _stack(*leaves: Any) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype,
                                    sharding=_shift_sharding(first.sharding, stacked=True))
    return (np if all(isinstance(x, np.ndarray) for x in leaves) else jnp).stack(leaves)


def _take(leaf: Any, index: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype,
                                    sharding=_shift_sharding(leaf.sharding, stacked=False))
    return leaf[index]


# ----------------------------------------------------------------- one stack
def _layer_keys(parent: Mapping, name: str, where: str) -> list[str]:
    """The keys ``name_0 .. name_{n-1}`` of ``parent`` in layer order (checked contiguous)."""
    pattern = re.compile(rf"{re.escape(name)}_(\d+)")
    found = sorted((int(m.group(1)), key) for key in parent if (m := pattern.fullmatch(key)))
    keys = [key for _, key in found]
    if [index for index, _ in found] != list(range(len(found))):
        raise ValueError(f"{where}: unrolled layers {keys} are not numbered 0..{len(found) - 1}")
    return keys


def _depth(parent: Mapping, name: str, where: str) -> tuple[str, int] | None:
    """("scanned" | "unrolled", number of layers) of the stack ``name`` in ``parent``, None if absent."""
    keys = _layer_keys(parent, name, where)
    if name in parent:
        if keys:
            raise ValueError(f"{where}: holds both the scanned {name!r} and unrolled {keys[0]!r}.. layers")
        leaves = jax.tree.leaves(parent[name])
        depths = {int(leaf.shape[0]) for leaf in leaves}
        if len(depths) != 1:
            raise ValueError(f"{where}/{name}: scanned leaves disagree on the number of layers: {sorted(depths)}")
        return "scanned", depths.pop()
    return ("unrolled", len(keys)) if keys else None


def _stack_one(parent: Mapping, name: str, where: str) -> dict:
    keys = _layer_keys(parent, name, where)
    try:
        stacked = jax.tree.map(_stack, *[parent[key] for key in keys])
    except ValueError as e:  # different tree structures in different layers
        raise ValueError(f"{where}: layers {keys[0]}..{keys[-1]} do not all have the same parameters: {e}") from None
    rest = {key: value for key, value in parent.items() if key not in keys}
    return {**rest, name: stacked}


def _unstack_one(parent: Mapping, name: str, depth: int) -> dict:
    rest = {key: value for key, value in parent.items() if key != name}
    return {**rest, **{f"{name}_{i}": jax.tree.map(lambda leaf, i=i: _take(leaf, i), parent[name])
                       for i in range(depth)}}


def _convert(params: Mapping, want: dict[str, str | None]) -> Mapping:
    """``params`` with each stack in ``want`` ("scanned" | "unrolled" | None = as it is) converted;
    ``params`` itself (the same object) when nothing needs converting."""
    original, params = params, dict(params)
    changed = False
    for stack in STACKS:
        parent_name, name = stack.split("/")
        target = want.get(stack)
        parent = params.get(parent_name)
        if target is None or not isinstance(parent, Mapping):
            continue
        state = _depth(parent, name, parent_name)
        if state is None or state[0] == target:
            continue
        params[parent_name] = (_stack_one(parent, name, parent_name) if target == "scanned"
                               else _unstack_one(parent, name, state[1]))
        changed = True
    return params if changed else original


# ----------------------------------------------------------------- public
def stack_layers(params: Mapping) -> Mapping:
    """Unrolled layout -> scanned: every ``<tower>/<block>_{i}`` of ``STACKS`` stacked into ``<tower>/<block>``.

    Leaves: arrays (numpy stays numpy) or ``jax.ShapeDtypeStruct`` (with their sharding shifted);
    already-scanned stacks are kept. Works under ``jax.jit``.
    """
    return _convert(params, dict.fromkeys(STACKS, "scanned"))


def unstack_layers(params: Mapping) -> Mapping:
    """Scanned layout -> unrolled (the reference / converter layout): the inverse of :func:`stack_layers`."""
    return _convert(params, dict.fromkeys(STACKS, "unrolled"))


def layouts(params: Mapping) -> dict[str, tuple[str, int]]:
    """``{stack: ("scanned" | "unrolled", number of layers)}`` for the stacks ``params`` has.

    ``params``: any nested mapping whose leaves have ``.shape`` (arrays, ``ShapeDtypeStruct``s, orbax metadata).
    """
    found = {}
    for stack in STACKS:
        parent_name, name = stack.split("/")
        parent = params.get(parent_name)
        state = _depth(parent, name, parent_name) if isinstance(parent, Mapping) else None
        if state is not None:
            found[stack] = state
    return found


def match_layout(params: Mapping, like: Mapping, names: tuple[str, str] = ("checkpoint", "model")) -> Mapping:
    """``params`` converted to the layout of ``like`` stack by stack (a stack ``like`` lacks is left as is);
    ``params`` itself when the layouts already agree.

    ``like``: only its keys and leading leaf dims are read (arrays, ``ShapeDtypeStruct``s or orbax metadata).
    Raises ValueError naming the stack when the two disagree on a stack's number of layers; ``names``
    (of ``params``, of ``like``) word that message.
    """
    have, want = layouts(params), layouts(like)
    for stack in sorted(set(have) & set(want)):
        if have[stack][1] != want[stack][1]:
            raise ValueError(f"{stack}: the {names[0]} has {have[stack][1]} layers ({have[stack][0]}), the "
                             f"{names[1]} has {want[stack][1]} ({want[stack][0]})")
    return _convert(params, {stack: state for stack, (state, _) in want.items()})


def describe(layout: Mapping[str, tuple[str, int]]) -> str:
    """``{"image/blocks": ("scanned", 12)}`` -> "image/blocks scanned x12"."""
    return ", ".join(f"{stack} {state} x{depth}" for stack, (state, depth) in sorted(layout.items())) or "no stacks"
