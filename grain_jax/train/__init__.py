"""GRAIN / CLIP training: ``train_and_evaluate(config, workdir)`` and its parts.

``optimizer`` (AdamW, weight-decay rules, schedule, durations), ``state`` (model from the
config, sharded init), ``step`` (the jitted train step), ``resume`` (orbax checkpoints of the
train state, corrupt-checkpoint fallback, init_from, SIGTERM), ``metrics`` (TensorBoard/JSON-lines/console,
MFU), ``trainer``.
"""
from grain_jax.train.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
