"""AdamW with a weight-decay mask by rule, the warmup+cosine schedule, and duration conversion.

``make_schedule`` and ``make_optimizer`` take their values as arguments; ``trainer.schedule_from_config`` and
``trainer.optimizer_from_config`` read them from these config keys (all top level):

| key | meaning |
|---|---|
| `lr`, `lr_start`, `lr_end` | peak, warmup-start and final learning rate (reference 1e-3, 1e-6, 1e-5) |
| `warmup_steps` / `warmup_epochs` / `warmup_examples` | at most one set; none = no warmup |
| `total_steps` / `total_epochs` / `total_examples` | one set (if several: steps, then examples, then epochs win) |
| `weight_decay`, `wd_rule` | decoupled decay (0.1) and which parameters get it (`"default"` or `"reference"`) |
| `adam` | `{b1: 0.9, b2: 0.98, eps: 1e-8}` |
| `grad_clip_norm` | global-norm clipping threshold, None = off |
| `lr_multipliers` | `((path prefix, factor), ...)`: parameters under a prefix (e.g. `"decoder"`) take `factor` × the schedule's learning rate (their decay too); `()` = one rate for all |
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax
from absl import logging
from flax import traverse_util

from grain_jax.models import scan

DURATION_UNITS = ("steps", "examples", "epochs")  # precedence order


def steps_from_duration(config: Any, prefix: str, *, num_train_examples: int | None, global_batch_size: int,
                        default: int | None = None) -> int:
    """Converts ``config.{prefix}_{steps|examples|epochs}`` into optimizer steps.

    The one place durations are converted (big_vision's ``u.steps``). If several are set,
    the first of steps, examples, epochs wins (with a warning), so ``--config.total_steps=100``
    shortens an epoch-based config from the command line. An epoch is
    ``num_train_examples // global_batch_size`` steps (the last partial batch is dropped, like
    the reference's ``drop_last``); fractional epochs round to the nearest step.

    Raises:
      ValueError: naming the keys if none is set (and there is no ``default``), if a value is
        negative, or if epochs are asked for without knowing the number of training records.
    """
    given = {unit: config.get(f"{prefix}_{unit}") for unit in DURATION_UNITS}
    given = {unit: value for unit, value in given.items() if value is not None}
    if not given:
        if default is None:
            raise ValueError(f"config needs one of {', '.join(f'{prefix}_{u}' for u in DURATION_UNITS)}")
        return default
    if len(given) > 1:
        logging.warning("several durations set (%s); using %s_%s", given, prefix, next(iter(given)))
    unit, value = next(iter(given.items()))
    if value < 0:
        raise ValueError(f"{prefix}_{unit} must be >= 0, got {value}")
    if unit == "steps":
        return int(value)
    if unit == "examples":
        return int(round(value / global_batch_size))
    if not num_train_examples:
        raise ValueError(f"{prefix}_epochs needs the number of training records, which is unknown")
    steps_per_epoch = num_train_examples // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"global_batch_size {global_batch_size} exceeds the {num_train_examples} training records")
    return int(round(value * steps_per_epoch))


def make_schedule(*, lr: float, lr_start: float, lr_end: float, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
    """Linear warmup ``lr_start -> lr`` over ``warmup_steps``, then cosine ``lr -> lr_end`` until ``total_steps``.

    Same shape as the reference's ``cosine_scheduler`` (which uses an inclusive
    ``linspace`` for warmup, so its peak arrives one step earlier).
    """
    if warmup_steps > total_steps:
        raise ValueError(f"warmup ({warmup_steps} steps) is longer than training ({total_steps} steps)")
    return optax.warmup_cosine_decay_schedule(
        init_value=lr_start, peak_value=lr, warmup_steps=warmup_steps, decay_steps=max(total_steps, 1),
        end_value=lr_end)


# Weight-decay rules: a parameter decays unless its rule says otherwise, given the "/"-joined
# path (e.g. "decoder/layers_0/self_attn/qkv_bias") and its number of dimensions.
# "default": no decay for biases (including the packed [3, H, Dh] `qkv_bias`), norm scales
# and logit_scale. "reference": the PyTorch code's `optim_policy`: the
# towers skip every 1-D torch parameter (the same set as "default"); the decoder skips only
# names containing ".bias", so its LayerNorm scales, query embeddings, projections and packed
# attention input bias (torch `in_proj_bias`, our `qkv_bias`) *are* decayed, while Linear,
# LayerNorm and attention output biases (`out_bias`) are not.
_BIAS = re.compile(r"(^|/|_)bias$")
_DECODER_NO_DECAY = re.compile(r"(^|/)(out_)?bias$")


def _default_decays(path: str, ndim: int) -> bool:
    return ndim >= 2 and not _BIAS.search(path)


def _reference_decays(path: str, ndim: int) -> bool:
    if path.startswith("decoder/"):
        return not _DECODER_NO_DECAY.search(path)
    return _default_decays(path, ndim)


WD_RULES: dict[str, Callable[[str, int], bool]] = {"default": _default_decays, "reference": _reference_decays}


def weight_decay_mask(params: Any, rule: str = "default") -> Any:
    """A pytree of bools like ``params``: True where weight decay applies."""
    if rule not in WD_RULES:
        raise ValueError(f"unknown wd_rule {rule!r}; choose from {sorted(WD_RULES)}")
    decays = WD_RULES[rule]
    flat = traverse_util.flatten_dict(params, sep="/")
    # A scanned stack's leaves carry a leading layers axis: the rules see each layer's own number of dims.
    return traverse_util.unflatten_dict({path: decays(path, leaf.ndim - scan.is_stacked_path(path))
                                         for path, leaf in flat.items()}, sep="/")


def lr_multiplier_labels(params: Any, multipliers: tuple = ()) -> Any:
    """A pytree of floats like ``params``: each leaf's learning-rate factor, from the first
    ``(path prefix, factor)`` of ``multipliers`` whose prefix is a whole "/"-joined head of its path, else 1.0.

    Raises ValueError naming ``config.lr_multipliers`` for a factor <= 0 or a prefix that matches no parameter.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    rules = [(str(prefix).strip("/"), float(factor)) for prefix, factor in multipliers]
    for prefix, factor in rules:
        if factor <= 0:
            raise ValueError(f"config.lr_multipliers: factor for {prefix!r} must be positive, got {factor}")
        if not any(path == prefix or path.startswith(prefix + "/") for path in flat):
            heads = sorted({path.split("/")[0] for path in flat})
            raise ValueError(f"config.lr_multipliers: prefix {prefix!r} matches no parameter; top-level "
                             f"parameters: {heads}")
    return traverse_util.unflatten_dict(
        {path: next((factor for prefix, factor in rules if path == prefix or path.startswith(prefix + "/")), 1.0)
         for path in flat}, sep="/")


def make_optimizer(params: Any, schedule: optax.Schedule, *, weight_decay: float, wd_rule: str, b1: float,
                   b2: float, eps: float, grad_clip_norm: float | None = None,
                   lr_multipliers: tuple = ()) -> optax.GradientTransformation:
    """``[clip_by_global_norm] -> adamw(schedule, mask) [-> per-group scale]``; ``params`` may be abstract (only
    shapes are read).

    ``wd_rule``: which parameters decay (``WD_RULES``); ``grad_clip_norm``: None or 0 = no clipping;
    ``lr_multipliers``: ``((path prefix, factor), ...)`` (``lr_multiplier_labels``). Scaling AdamW's update by a
    factor is the same as scaling its learning rate (decoupled decay included). Without multipliers the
    optimizer state has the same structure as before they existed, so older checkpoints restore.
    """
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=weight_decay_mask(params, wd_rule))
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    parts.append(adamw)
    if lr_multipliers:
        factors = lr_multiplier_labels(params, tuple(lr_multipliers))
        labels = jax.tree.map(str, factors)
        parts.append(optax.multi_transform({str(f): optax.scale(f) for f in jax.tree.leaves(factors)}, labels))
    return optax.chain(*parts) if len(parts) > 1 else adamw
