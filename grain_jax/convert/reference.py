"""The authors' PyTorch GRAIN checkpoints -> a grain_jax checkpoint.

train.py saves ``{'epoch', 'state_dict': decoder, 'backbone_state_dict': backbone,
'best_acc', 'optimizer', 'iteration'}`` (keys prefixed ``module.`` under DDP). The
backbone follows clip/custom_models.py (timm ViT with qk-norm as ``visual``, OpenAI text
tower, ``image_projection``, ``text_projection``, ``logit_scale``), the decoder
model/tfm.py (``ObjDecoder`` around ``Cross_Attention``). A ``.safetensors`` input holds
the same tensors with keys prefixed ``backbone.`` and ``decoder.``.

Dead weights are reported, not converted: the decoder's ``class_embed`` (22048-way head
used only for a logging metric), ``pos_embed`` and ``temporal_embed`` (video-model
leftovers), ``query_index`` (only built when Q == 1), and, for GRAIN, the backbone's
``image_projection`` (the image embedding comes from the decoder's global query).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from grain_jax.checkpoints import ModelSpec
from grain_jax.convert import common, towers

log = logging.getLogger(__name__)

DEAD_DECODER_KEYS = ("class_embed.", "pos_embed", "temporal_embed", "query_index.")
DEAD_GRAIN_BACKBONE_KEYS = ("image_projection",)


def split_checkpoint(saved: Any, path: str) -> tuple[Mapping[str, Any], Mapping[str, Any] | None]:
    """(backbone state dict, decoder state dict or None) from what ``load_checkpoint`` returned."""
    if isinstance(saved, Mapping) and "backbone_state_dict" in saved:
        return saved["backbone_state_dict"], saved.get("state_dict")
    if isinstance(saved, Mapping) and any(str(k).startswith("backbone.") for k in saved):
        backbone = {k[len("backbone."):]: v for k, v in saved.items() if k.startswith("backbone.")}
        decoder = {k[len("decoder."):]: v for k, v in saved.items() if k.startswith("decoder.")}
        others = sorted(k for k in saved if not k.startswith(("backbone.", "decoder.")))
        if others:
            raise common.ConversionError(f"{path}: keys outside 'backbone.' / 'decoder.': {others[:10]}")
        return backbone, decoder or None
    found = sorted(saved)[:10] if isinstance(saved, Mapping) else type(saved).__name__
    raise common.ConversionError(
        f"{path}: not a GRAIN reference checkpoint: expected a dict with 'backbone_state_dict' (and 'state_dict' "
        f"for the decoder), or safetensors keys prefixed 'backbone.' / 'decoder.'; found {found}")


def convert_state_dicts(backbone_state: Mapping[str, Any], decoder_state: Mapping[str, Any] | None,
                        model_name: str = "grain-vit-b16", model_overrides: Mapping[str, Any] | None = None):
    """Maps the reference's tensors onto ``model_name``.

    The number of region queries is read from ``query_embed`` (rows - 1, the last row
    being the global image query); everything else must match the named model.

    Returns:
      (params nested dict of numpy arrays, ModelSpec, model, unused keys).
    """
    from grain_jax.models import create_model
    from grain_jax.models.vit import decode_variant

    backbone = common.TensorSource(common.state_dict_arrays(backbone_state), "backbone_state_dict")
    overrides = dict(model_overrides or {})
    probe = create_model(model_name, **overrides)
    if probe.has_grounding:
        if decoder_state is None:
            raise common.ConversionError(f"{model_name} is a GRAIN model but the checkpoint has no decoder 'state_dict'")
        decoder = common.TensorSource(common.state_dict_arrays(decoder_state), "state_dict (decoder)")
        if "query_embed.weight" in decoder:  # (a missing one is reported by the mapping below)
            overrides["num_queries"] = int(decoder.arrays["query_embed.weight"].shape[0]) - 1
    elif decoder_state:
        log.info("%s is a CLIP model: the checkpoint's decoder 'state_dict' is not converted", model_name)
    model = create_model(model_name, **overrides)

    vit = decode_variant(model.vit_variant)
    if not model.vit_qk_norm or model.vit_pre_norm or not model.vit_patch_bias:
        raise common.ConversionError(f"{model_name} is not the reference's timm qk-norm ViT; use the open_clip "
                                     "converter for OpenAI-style image towers")
    params = {
        "image": towers.timm_vit(backbone, "visual.", depth=vit["depth"], num_heads=vit["num_heads"]),
        "text": towers.openai_text(backbone, depth=model.text_layers, num_heads=model.text_heads),
        "logit_scale": backbone.take("logit_scale").reshape(()),
    }
    unused = []
    if model.has_grounding:
        params["decoder"] = towers.grounding_decoder(decoder, depth=model.decoder_layers, num_heads=model.decoder_heads)
        unused += common.report_unused(decoder, common.matches_any(DEAD_DECODER_KEYS))
        unused += common.report_unused(backbone, common.matches_any(DEAD_GRAIN_BACKBONE_KEYS))
    else:
        params["image_projection"] = backbone.take("image_projection")
        unused += common.report_unused(backbone, common.matches_any(()))
    spec = ModelSpec(model_name=model_name, model_overrides=overrides, image_size=model.image_size,
                     caption_length=model.context_length, description_length=model.context_length)
    return params, spec, model, unused


def convert_file(input_path: str, output_dir: str, model_name: str = "grain-vit-b16",
                 model_overrides: Mapping[str, Any] | None = None) -> dict:
    """Reads ``input_path`` (never executing pickled code), converts, checks and writes ``output_dir``."""
    backbone_state, decoder_state = split_checkpoint(common.load_checkpoint(input_path), input_path)
    params, spec, model, unused = convert_state_dicts(backbone_state, decoder_state, model_name, model_overrides)
    num_params = common.write_checkpoint(output_dir, params, model, spec)
    return {"model_name": model_name, "num_params": num_params, "unused": unused}
