"""The jitted train step: forward + ``total_loss`` (``inference.objective``), grads, AdamW, logit-scale clamp.

Gradient accumulation (``config.grad_accum_steps = k``) is GradCache (``grad_cache.py``):
the step embeds the global batch in k micro-batches, computes the loss on the full
batch, and back-propagates micro-batch by micro-batch, so the contrastive losses keep
all B negatives and the gradients equal those of one step on the full batch.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from grain_jax import models
from grain_jax.inference.objective import forward_loss, model_outputs
from grain_jax.losses import total_loss
from grain_jax.train import grad_cache
from grain_jax.train.state import TrainState

# The reference clamps the learnable log temperature to [0, ln 100] after every update.
LOGIT_SCALE_MAX = math.log(100.0)


def make_gradient_fn(model: nn.Module, loss_config: Any, grad_accum_steps: int = 1, *,
                     mean: Sequence[float], std: Sequence[float], grad_reduce_dtype: str = "compute") -> Callable:
    """``gradients(params, batch, rng) -> ((loss, metrics), grads)``; GradCache over k > 1 micro-batches.

    ``grad_reduce_dtype`` (``config.grad_reduce_dtype``): ``"compute"`` leaves the data-parallel gradient
    all-reduce to the partitioner, which reduces each weight's gradient in the dtype its layer computes in
    (bf16 with ``config.dtype="bfloat16"``); ``"float32"`` reduces the fp32 parameter gradients
    (``grad_cache.make_fp32_reduced_gradient_fn``). GradCache (k > 1) always reduces fp32 gradients.
    """
    apply_fn = functools.partial(model_outputs, model, mean=mean, std=std, loss_config=loss_config)
    loss_fn = functools.partial(total_loss, config=loss_config)
    if grad_accum_steps > 1:
        return grad_cache.make_gradient_fn(apply_fn, loss_fn, grad_accum_steps,
                                           nn.get_partition_spec(models.abstract_params(model)))
    if grad_reduce_dtype == "float32":
        return grad_cache.make_fp32_reduced_gradient_fn(apply_fn, loss_fn)
    return jax.value_and_grad(functools.partial(forward_loss, model, loss_config, mean=mean, std=std), has_aux=True)


def make_train_step(model: nn.Module, loss_config: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1, *, mean: Sequence[float],
                    std: Sequence[float], grad_reduce_dtype: str = "compute") -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``; metrics are fp32 scalars.

    ``mean`` / ``std``: the per-channel image statistics (``config.data``) that normalise the
    batch's uint8 images inside the step. ``grad_reduce_dtype``: see ``make_gradient_fn``.

    The per-step randomness is ``fold_in(rng, state.step)``, so a resumed run draws
    exactly the same dropout masks as an uninterrupted one. A step whose loss,
    gradients or new parameters are not finite leaves the state unchanged and
    reports ``finite = 0`` (the host then stops; see ``trainer``).
    """
    gradients = make_gradient_fn(model, loss_config, grad_accum_steps, mean=mean, std=std,
                                 grad_reduce_dtype=grad_reduce_dtype)

    def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
        (loss, metrics), grads = gradients(state.params, batch, jax.random.fold_in(rng, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, LOGIT_SCALE_MAX)}

        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        # Keep the last good state on a non-finite step (but count the step).
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                 state.replace(step=state.step + 1))
        metrics = {**metrics, "loss/total": loss, "lr": schedule(state.step), "grad_norm": grad_norm,
                   "param_norm": param_norm, "logit_scale": jnp.exp(params["logit_scale"]),
                   "finite": finite.astype(jnp.float32),
                   # Per tower (image, text, decoder, ...): which part the losses pull on, and how hard.
                   **{f"grad_norm/{part}": optax.tree.norm(g) for part, g in grads.items() if part != "logit_scale"}}
        return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)

    return train_step
