"""OpenAI CLIP / open_clip weights -> a grain_jax CLIP-mode checkpoint.

The architecture comes from open_clip's config for ``--arch`` (``open_clip.get_model_config``);
the converted model is ``clip-vit-b16-openai`` with overrides for the sizes, so it computes
what open_clip computes: ViT with bias-free patch conv, class token, ``ln_pre``, no qk-norm,
LayerNorm eps 1e-5, ``ln_post`` on the CLS token and ``proj``; the OpenAI text tower;
QuickGELU or exact GELU as the config says (OpenAI's own weights: QuickGELU, the
``-quickgelu`` archs). Inputs: a plain state dict (``.pt``/``.pth``/``.bin``, optionally
under ``state_dict`` as open_clip's training checkpoints save it), ``.safetensors``
(open_clip's Hugging Face files), or OpenAI's TorchScript ``.pt`` archives.

Preprocessing note: the spec stores OpenAI's mean/std and the image size; grain_jax
squash-resizes to that size, where open_clip resizes the short side and centre-crops,
so feed square images for identical inputs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from grain_jax.checkpoints import ModelSpec
from grain_jax.convert import common, towers

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BASE_MODEL = "clip-vit-b16-openai"
# Not weights: metadata scalars of OpenAI's TorchScript files (open_clip drops them too), and
# the causal-mask buffer a TorchScript export of an open_clip model carries.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# Config entries grain_jax's towers implement, with the values they support when not free.
_VISION_FREE = {"image_size", "layers", "width", "patch_size", "head_width"}
_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers"}
_FIXED = {"mlp_ratio": 4.0, "pool_type": "tok", "no_ln_pre": False, "final_ln_after_pool": False,
          "pos_embed_type": "learnable", "ls_init_value": None, "attentional_pool": False,
          "patch_dropout": 0.0, "output_tokens": False, "qk_norm": False, "proj_bias": False,
          "proj_type": "linear", "embed_cls": False, "no_causal_mask": False}


def _arch_config(arch: str) -> dict:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("the open_clip converter reads architectures from open_clip: pip install -e '.[convert]'") from e
    config = open_clip.get_model_config(arch)
    if config is None:
        raise common.ConversionError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    return config


def _check_supported(arch: str, tower: str, cfg: Mapping[str, Any], free: set[str]) -> None:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    defaults = dataclasses.asdict(CLIPVisionCfg() if tower == "vision" else CLIPTextCfg())
    unsupported = {k: v for k, v in cfg.items()
                   if k not in free and not (k in _FIXED and v == _FIXED[k]) and v != defaults.get(k, object())}
    if unsupported:
        raise common.ConversionError(f"{arch}: {tower}_cfg settings grain_jax's CLIP towers do not implement: "
                                     f"{unsupported}")


def model_for_arch(arch: str, quick_gelu: bool | None = None) -> tuple[str, dict]:
    """(model name, overrides) of the grain_jax model computing what open_clip's ``arch`` computes."""
    from grain_jax.models import create_model
    from grain_jax.models.vit import VIT_VARIANTS

    config = _arch_config(arch)
    vision, text = dict(config["vision_cfg"]), dict(config["text_cfg"])
    _check_supported(arch, "vision", vision, _VISION_FREE)
    _check_supported(arch, "text", text, _TEXT_FREE)
    quick_gelu = bool(config.get("quick_gelu", False)) if quick_gelu is None else quick_gelu

    width, depth, patch = vision.get("width", 768), vision.get("layers", 12), vision.get("patch_size", 16)
    heads = width // vision.get("head_width", 64)
    variant = next((name for name, dims in VIT_VARIANTS.items() if dims == (width, depth, heads)), None)
    if variant is None:
        raise common.ConversionError(f"{arch}: no grain_jax ViT variant has width {width}, depth {depth}, "
                                     f"{heads} heads (known: {VIT_VARIANTS})")
    activation = "quick_gelu" if quick_gelu else "gelu"
    wanted = {
        "mode": "clip", "vit_variant": f"{variant}/{patch}", "image_size": int(vision.get("image_size", 224)),
        "vit_qk_norm": False, "vit_pre_norm": True, "vit_patch_bias": False, "vit_ln_eps": 1e-5,
        "vit_activation": activation, "text_activation": activation, "embed_dim": int(config["embed_dim"]),
        "text_width": int(text.get("width", 512)), "text_heads": int(text.get("heads", 8)),
        "text_layers": int(text.get("layers", 12)), "context_length": int(text.get("context_length", 77)),
        "vocab_size": int(text.get("vocab_size", 49408)),
    }
    base = create_model(BASE_MODEL)
    return BASE_MODEL, {k: v for k, v in wanted.items() if getattr(base, k) != v}


def convert_state_dict(state: Mapping[str, Any], arch: str, quick_gelu: bool | None = None):
    """Returns (params, ModelSpec, model, unused keys)."""
    from grain_jax.models import create_model
    from grain_jax.models.vit import decode_variant

    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # an open_clip training checkpoint
    source = common.TensorSource(common.state_dict_arrays(state), "open_clip state dict")
    model_name, overrides = model_for_arch(arch, quick_gelu)
    model = create_model(model_name, **overrides)
    vit = decode_variant(model.vit_variant)
    image, image_projection = towers.openai_vit(source, "visual.", depth=vit["depth"], num_heads=vit["num_heads"])
    params = {
        "image": image,
        "image_projection": image_projection,
        "text": towers.openai_text(source, depth=model.text_layers, num_heads=model.text_heads),
        "logit_scale": source.take("logit_scale").reshape(()),
    }
    unused = common.report_unused(source, common.matches_any(NON_WEIGHT_KEYS))
    spec = ModelSpec(model_name=model_name, model_overrides=overrides, image_size=model.image_size,
                     mean=OPENAI_MEAN, std=OPENAI_STD, caption_length=model.context_length,
                     description_length=model.context_length)
    return params, spec, model, unused


def convert_file(input_path: str, output_dir: str, arch: str, quick_gelu: bool | None = None) -> dict:
    """Reads ``input_path`` (OpenAI TorchScript archives imply QuickGELU), converts, checks, writes."""
    saved = common.load_checkpoint(input_path, allow_torchscript=True)
    if quick_gelu is None and common.is_torchscript(input_path):
        quick_gelu = True  # OpenAI's released models were trained with QuickGELU
    params, spec, model, unused = convert_state_dict(saved, arch, quick_gelu)
    num_params = common.write_checkpoint(output_dir, params, model, spec)
    return {"model_name": spec.model_name, "num_params": num_params, "unused": unused}
