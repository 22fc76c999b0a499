"""Value checks of a training config, run before any data, model or compilation is touched.

Each rule names the config key and its allowed range, so ``--config.lr=nan`` or
``--config.data.image_size=0`` stops within seconds with one line instead of after a
minute-long compile (or never). ``trainer.validate_config`` calls :func:`check_values`
first, then its structural checks (batch shards, durations, evaluators);
:func:`check_warmup` runs once the durations are converted into steps.
"""
from __future__ import annotations

import math
from typing import Any

from grain_jax.data.tokenizer import DEFAULT_CONTEXT_LENGTH
from grain_jax.models import text_batching
from grain_jax.train.optimizer import DURATION_UNITS, steps_from_duration

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
PARAM_DTYPES = ("bfloat16", "float32")
GRAD_REDUCE_DTYPES = ("compute", "float32")
LOSS_WEIGHTS = ("image_caption", "box_l1", "box_giou", "box_factor", "region_description", "global_description",
                "match_l1", "match_giou", "match_similarity")


def _number(config: Any, key: str) -> Any:
    """``config.a.b`` for key ``"a.b"``; None if a section or the key is missing."""
    value = config
    for part in key.split("."):
        if value is None or part not in value:
            return None
        value = value[part]
    return value


def _check_range(problems: list[str], key: str, value: Any, low: float, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = True) -> None:
    """Appends a problem unless ``value`` is a finite number in the interval ``low..high``."""
    if value is None:
        return
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    allowed = f"a finite number in {left}{low:g}, {high:g}{right}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"config.{key} must be {allowed}, got {value!r}")
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        problems.append(f"config.{key} must be {allowed}, got {value!r}")


def _check_mesh(problems: list[str], key: str, value: Any, allow_fill: bool) -> None:
    """3 integers (data, fsdp, tensor), each >= 1 (one may be -1 when ``allow_fill``)."""
    fill = ", one may be -1 (fills the rest)" if allow_fill else ""
    message = f"config.{key} must be 3 integers (data, fsdp, tensor), each >= 1{fill}; got {value!r}"
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or len(value) != 3:
        problems.append(message)
        return
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        problems.append(message)
        return
    fills = sum(v == -1 for v in value)
    if any(v < 1 and not (allow_fill and v == -1) for v in value) or fills > 1:
        problems.append(message)


def _model(config: Any) -> Any:
    """The (unbuilt) model the config describes; raises ValueError naming config.model_name / config.model."""
    from grain_jax.models import create_model
    from grain_jax.train.state import model_overrides
    try:
        return create_model(config.model_name, **model_overrides(config))
    except (TypeError, ValueError) as error:
        raise ValueError(f"config.model_name={config.model_name!r} / config.model: {error}") from None


def check_values(config: Any) -> None:
    """Raises ValueError listing every out-of-range value of ``config`` (one ``config.key must ...`` each)."""
    problems: list[str] = []
    _check_range(problems, "lr", _number(config, "lr"), 0, low_open=True)
    for key in ("lr_start", "lr_end", "weight_decay"):
        _check_range(problems, key, _number(config, key), 0)
    for key in ("adam.b1", "adam.b2"):
        _check_range(problems, key, _number(config, key), 0, 1)
    _check_range(problems, "adam.eps", _number(config, "adam.eps"), 0, low_open=True)
    _check_range(problems, "grad_clip_norm", _number(config, "grad_clip_norm"), 0, low_open=True)
    for key in LOSS_WEIGHTS:
        _check_range(problems, f"loss.{key}", _number(config, f"loss.{key}"), 0)
    _check_range(problems, "data.mllm_caption_prob", _number(config, "data.mllm_caption_prob"), 0, 1,
                 high_open=False)
    for i, std in enumerate(_number(config, "data.std") or ()):
        _check_range(problems, f"data.std[{i}]", std, 0, low_open=True)
    for key, allowed, default in (("dtype", COMPUTE_DTYPES, None), ("param_dtype", PARAM_DTYPES, None),
                                  ("grad_reduce_dtype", GRAD_REDUCE_DTYPES, "compute")):
        if config.get(key, default) not in allowed:
            problems.append(f"config.{key} must be one of {list(allowed)}, got {config.get(key, default)!r}")
    if config.get("grad_reduce_dtype") == "float32" and config.get("param_dtype") != "float32":
        problems.append(f"config.grad_reduce_dtype='float32' needs config.param_dtype='float32' (the gradients are "
                        f"reduced in the parameters' dtype), got {config.get('param_dtype')!r}")
    _check_mesh(problems, "mesh_shape", config.get("mesh_shape"), allow_fill=True)
    if config.get("dcn_mesh_shape") is not None:
        _check_mesh(problems, "dcn_mesh_shape", config.dcn_mesh_shape, allow_fill=False)
    profile = config.get("profile_steps")
    if profile is not None and not (isinstance(profile, (tuple, list)) and len(profile) == 2
                                    and all(isinstance(v, int) and not isinstance(v, bool) for v in profile)
                                    and 0 <= profile[0] < profile[1]):
        problems.append(f"config.profile_steps must be (start, stop) with 0 <= start < stop (steps [start, stop) "
                        f"are traced), got {profile!r}")
    try:
        text_batching.check_buckets(_number(config, "data.text_length_buckets") or ())
    except ValueError as error:
        problems.append(str(error))
    image_size = _number(config, "data.image_size")
    if not isinstance(image_size, int) or image_size <= 0:
        problems.append(f"config.data.image_size must be a positive integer, got {image_size!r}")
    if problems:  # the model is only described below once dtypes and sizes are sane
        raise ValueError("; ".join(problems))

    model = _model(config)
    _check_range(problems, "model.decoder_dropout", model.decoder_dropout, 0, 1)
    from grain_jax.models.vit import decode_variant
    patch = decode_variant(model.vit_variant)["patch_size"]
    if image_size % patch:
        problems.append(f"config.data.image_size={image_size} must be a multiple of the patch size {patch} "
                        f"(vit_variant {model.vit_variant!r})")
    if not 1 <= model.context_length <= DEFAULT_CONTEXT_LENGTH:
        problems.append(f"config.model.context_length must be in 1..{DEFAULT_CONTEXT_LENGTH} (the CLIP tokenizer's "
                        f"context), got {model.context_length!r}")
    for key in ("data.caption_length", "data.description_length"):
        value = _number(config, key)
        if not isinstance(value, int) or not 1 <= value <= model.context_length:
            problems.append(f"config.{key} must be an integer in 1..{model.context_length} (the text tower's "
                            f"context_length), got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if not any(config.get(f"{prefix}_epochs") is not None for prefix in ("total", "warmup")):
        # Epoch-based durations need the dataset size; the trainer checks them once it is known.
        sizes = dict(num_train_examples=None, global_batch_size=config.global_batch_size)
        check_warmup(config, steps_from_duration(config, "warmup", default=0, **sizes),
                     steps_from_duration(config, "total", **sizes))


def check_warmup(config: Any, warmup_steps: int, total_steps: int) -> None:
    """The warmup (in steps, after converting epochs/examples) must fit into the run."""
    if warmup_steps > total_steps:
        warmup, total = (next(f"{prefix}_{unit}" for unit in DURATION_UNITS if config.get(f"{prefix}_{unit}") is not None)
                         for prefix in ("warmup", "total"))
        raise ValueError(f"config.{warmup} ({warmup_steps} steps) must be <= config.{total} ({total_steps} steps)")
