"""The train state, the model built from the config, and sharded initialisation.

Sharded init follows flax's lm1b / big_vision: ``eval_shape`` the init to get the
logically-annotated shapes, turn the logical names into mesh shardings with the
config's rules, then ``jax.jit(init, out_shardings=...)`` so every parameter and
optimizer moment is created directly in its shard (a model never has to fit on
one device).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grain_jax import models
from grain_jax.checkpoints import ModelSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates applied so far
    params: Any
    opt_state: Any


def model_overrides(config: Any) -> dict:
    """``create_model`` overrides: the fields set in the config's ``model`` section (None: the registered
    model's value) plus image size and dtypes."""
    return {"image_size": config.data.image_size, "dtype": config.dtype, "param_dtype": config.param_dtype,
            **{key: value for key, value in config.model.to_dict().items() if value is not None}}


def model_spec(config: Any) -> ModelSpec:
    """What ``grain_jax.inference.load(workdir)`` needs to rebuild the model and its preprocessing."""
    return ModelSpec(model_name=config.model_name, model_overrides=model_overrides(config),
                     image_size=config.data.image_size, mean=tuple(config.data.mean), std=tuple(config.data.std),
                     caption_length=config.data.caption_length, description_length=config.data.description_length)


def build_model(config: Any) -> nn.Module:
    return models.create_model(config.model_name, **model_overrides(config))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(boxed_abstract_params: Any, mesh: Mesh, rules: tuple) -> Any:
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_abstract_params), mesh, rules)


def state_shardings(tx: optax.GradientTransformation, unboxed_abstract_params: Any, params_sh: Any,
                    mesh: Mesh) -> TrainState:
    """Optimizer moments follow their parameter's sharding; counters are replicated."""
    abstract_opt_state = jax.eval_shape(tx.init, unboxed_abstract_params)
    opt_sh = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt_state, params_sh,
                                   transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=params_sh, opt_state=opt_sh)


def create_train_state(model: nn.Module, tx_for: Any, mesh: Mesh, rules: tuple,
                       rng: jax.Array) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """Initialises the state directly sharded over ``mesh``.

    Args:
      tx_for: ``abstract_params -> optax.GradientTransformation`` (the weight-decay
        mask needs the parameter tree).
    Returns:
      ``(state, shardings, tx)``; ``shardings`` is a ``TrainState`` of ``NamedSharding``.
    """
    boxed = models.abstract_params(model)
    unboxed = nn.meta.unbox(boxed)
    tx = tx_for(unboxed)
    shardings = state_shardings(tx, unboxed, param_shardings(boxed, mesh, rules), mesh)

    def init(rng):
        params = nn.meta.unbox(models.init_params(model, rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings, tx


def count_params(params: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
