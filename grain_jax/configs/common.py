"""Shared config pieces: the typed ``parse_arg`` and the defaults every experiment starts from.

Config files are loaded by path (``--config grain_jax/configs/X.py:args``, or ``configs/X.py``
from the repository root, which links here) and import this module as ``grain_jax.configs.common``.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from grain_jax.losses import LossConfig
from grain_jax.models import GrainModel

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses ``"key=value,flag,..."`` against typed ``defaults`` (big_vision's ``parse_arg``).

    The default's type is the value's type; booleans are strict (true/false/1/0/yes/no) and
    a bare key means True (``:runlocal``). A single bare value that is not a boolean
    key goes to the first key (``clip_cc12m.py:L/14``). Unknown keys raise naming the key.

    >>> parse_arg("variant=L/14,runlocal", variant="B/16", runlocal=False).to_dict()
    {'variant': 'L/14', 'runlocal': True}
    """
    parsed = dict(defaults)
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    for index, part in enumerate(parts):
        key, has_value, value = part.partition("=")
        if not has_value:
            if isinstance(defaults.get(key), bool):
                parsed[key] = True
                continue
            if index == 0 and defaults:
                key, value = next(iter(defaults)), part
            else:
                raise ValueError(f"config argument {part!r}: not a boolean flag of {sorted(defaults)}")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        parsed[key] = _typed(key, value, defaults[key])
    return ml_collections.ConfigDict(parsed)


def _typed(key: str, value: str, default):
    if isinstance(default, bool):
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"config argument {key}={value!r} must be a boolean")
        return value.lower() in _TRUE
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def data_config(*, image_size: int, caption_length: int = 77, description_length: int = 77,
                max_boxes: int = 5, dir: str | None = None) -> ml_collections.ConfigDict:  # noqa: A002
    """``config.data`` (docs/interfaces.md section 6): squash resize + ImageNet normalisation, no augmentation.

    ``num_workers=-1``: worker processes sized from this process's CPU cores
    (``grain_jax.data.loader.resolve_num_workers``); 0 decodes in the training process.
    ``text_length_buckets`` (e.g. ``(16, 32, 48)``; () = off): each batch's captions and descriptions are cut
    to the shortest bucket that holds their last EOT, and the step runs compiled for that length
    (``grain_jax.models.text_batching``; docs/performance.md, "Length buckets").
    """
    return ml_collections.ConfigDict(dict(
        dir=ml_collections.FieldReference(dir, field_type=str), train_split="train", eval_split="validation", image_size=image_size,
        caption_length=caption_length, description_length=description_length, max_boxes=max_boxes,
        mllm_caption_prob=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=-1, prefetch=2, augment=False,
        text_length_buckets=()))


def loss_config(**overrides) -> ml_collections.ConfigDict:
    """``config.loss``: every ``LossConfig`` field with its default (the reference's box factor is 1.5, the paper's 1)."""
    return ml_collections.ConfigDict(dataclasses.asdict(LossConfig(**overrides)))


# Model fields the config sets elsewhere: the name picks the mode, data.image_size the size, dtype/param_dtype.
_MODEL_FIELDS_ELSEWHERE = ("parent", "name", "mode", "image_size", "dtype", "param_dtype")


def model_config(**overrides) -> ml_collections.ConfigDict:
    """``config.model``: every ``GrainModel`` field as a ``create_model`` override, so each one can be set on the
    command line (``--config.model.vit_qk_norm=False``); None keeps the registered model's value."""
    fields = [f for f in dataclasses.fields(GrainModel) if f.name not in _MODEL_FIELDS_ELSEWHERE]
    unknown = sorted(set(overrides) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"config.model has no field(s) {unknown}")
    return ml_collections.ConfigDict({f.name: ml_collections.FieldReference(overrides.get(f.name),
                                                                            field_type=type(f.default))
                                      for f in fields})


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with the reference's optimizer and schedule."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model_name = "grain-vit-b16"
    config.model = model_config(remat_policy="none")
    config.dtype = "bfloat16"  # compute; params and norms/softmax/losses stay fp32
    config.param_dtype = "float32"
    config.data = data_config(image_size=224)
    # ensure_synthetic(**sizes) of the embedded benchmark, used when data.dir is None (demo, runlocal).
    config.synthetic = ml_collections.FieldReference(None, field_type=dict)
    # Where data made for the run goes (None: WORKDIR/data); evaluator entries can follow it with
    # config.get_ref("data_cache_dir").
    config.data_cache_dir = ml_collections.FieldReference(None, field_type=str)
    config.loss = loss_config()

    config.global_batch_size = 2048
    config.total_steps = ml_collections.FieldReference(None, field_type=int)
    config.total_epochs = ml_collections.FieldReference(None, field_type=float)
    config.total_examples = ml_collections.FieldReference(None, field_type=int)
    config.warmup_steps = ml_collections.FieldReference(None, field_type=int)
    config.warmup_epochs = ml_collections.FieldReference(None, field_type=float)
    config.warmup_examples = ml_collections.FieldReference(None, field_type=int)
    config.lr = 1e-3
    config.lr_start = 1e-6
    config.lr_end = 1e-5
    config.weight_decay = 0.1
    config.wd_rule = "default"  # or "reference": the PyTorch code's exact rule
    config.adam = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, eps=1e-8))
    config.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)
    # ((path prefix, factor), ...): e.g. (("decoder", 2.0),) trains the grounding decoder at 2x the rate.
    config.lr_multipliers = ()
    config.grad_accum_steps = 1
    # Dtype of the data-parallel gradient all-reduce: "compute" (each weight's gradient in its layer's compute
    # dtype, bf16) or "float32" (as the reference's DDP; train/step.py make_gradient_fn).
    config.grad_reduce_dtype = "compute"

    config.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor) per slice; -1 fills the rest
    config.dcn_mesh_shape = ml_collections.FieldReference(None, field_type=tuple)  # multi-slice: slices per axis
    config.sharding_rules = ()  # extra (logical name, mesh axes) rules; first match wins
    # Param + optimizer bytes per device above fully sharded over (fsdp, tensor): warn or fail beyond max_excess.
    config.sharding_check = ml_collections.ConfigDict(dict(max_excess=0.05, action="warn"))

    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.init_from = ml_collections.FieldReference(None, field_type=str)
    config.dont_load = ()  # regexes of params kept freshly initialised when loading init_from
    # Pod operations: persistent XLA cache (None = WORKDIR/compilation_cache, "" = off; an already set
    # JAX_COMPILATION_CACHE_DIR wins), a jax.profiler trace of steps [start, stop) into WORKDIR/profile.
    config.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)
    config.profile_steps = ml_collections.FieldReference(None, field_type=tuple)
    config.evals = ml_collections.ConfigDict()
    return config
