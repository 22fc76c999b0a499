"""The training objective of one batch: the forward pass (uint8 images normalised on device) and ``total_loss``.

The one definition shared by the train step (``train/step.py``, ``train/grad_cache.py``) and the validation
evaluator, so validation losses are the training losses of the same parameters on the same batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

from grain_jax.data import transforms
from grain_jax.losses import total_loss


def text_keys(model: nn.Module, loss_config: Any = None) -> tuple[str, ...]:
    """The batch's token arrays the model encodes (what ``config.data.text_length_buckets`` cuts): a CLIP model
    is fed descriptions only when ``loss_config`` (a ``LossConfig``) has a ``global_description`` term."""
    descriptions = model.has_grounding or bool(getattr(loss_config, "global_description", 0))
    return ("caption_tokens", "description_tokens") if descriptions else ("caption_tokens",)


def model_outputs(model: nn.Module, params: Any, batch: dict, rng: jax.Array | None = None, train: bool = True, *,
                  mean: Sequence[float], std: Sequence[float], loss_config: Any = None) -> dict:
    """The model's ``out`` dict for a batch; descriptions are encoded as ``text_keys`` says.

    ``batch["images"]`` are the contract's uint8 pixels, normalised here on device with the
    data's ``mean`` / ``std`` (``transforms.normalize``, as inference does). ``rng``: dropout
    randomness (None: none, for ``train=False``).
    """
    descriptions = batch["description_tokens"] if "description_tokens" in text_keys(model, loss_config) else None
    pixels = transforms.normalize(batch["images"], mean, std)
    outputs, _ = model.apply({"params": params}, pixels, batch["caption_tokens"], descriptions,
                             train=train, rngs={} if rng is None else {"dropout": rng})
    return outputs


def forward_loss(model: nn.Module, loss_config: Any, params: Any, batch: dict, rng: jax.Array | None = None,
                 train: bool = True, *, mean: Sequence[float], std: Sequence[float]) -> tuple[jax.Array, dict]:
    """``(loss [], metrics)``: ``total_loss`` of one batch (arguments as in ``model_outputs``); an eval
    batch's ``mask`` [B] keeps padding examples out of the loss."""
    outputs = model_outputs(model, params, batch, rng, train, mean=mean, std=std, loss_config=loss_config)
    return total_loss(outputs, batch, loss_config)
