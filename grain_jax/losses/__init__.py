"""GRAIN losses: box utilities, on-device Hungarian matching, contrastive and grounding losses.

``total_loss(outputs, batch, config)`` is the entry point (see grounding.py);
``LossConfig(**config.loss)`` holds its weights.
"""
from grain_jax.losses.grounding import LossConfig, box_losses, total_loss
from grain_jax.losses.matching import Matches, match_boxes

__all__ = ["LossConfig", "Matches", "box_losses", "match_boxes", "total_loss"]
