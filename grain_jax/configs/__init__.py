"""Experiment configs (ml_collections ``get_config(arg)`` files), loaded by path:
``--config grain_jax/configs/demo.py:runlocal`` (``configs/`` at the repository root links here)."""
