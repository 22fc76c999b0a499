"""Evaluators on big_vision's ``config.evals`` contract (see ``common.from_config``).

* ``zeroshot``: zero-shot classification (top-1/5, mean per-class recall) on TFDS, ImageFolder
  and synthetic datasets (``datasets``), with templates (``prompts``) and descriptors (``descriptors``).
* ``retrieval``: image<->text Recall@1/5/10.
* ``validation``: the training losses on a prepared eval split.
"""
from grain_jax.evaluators.common import from_config

__all__ = ["from_config"]
