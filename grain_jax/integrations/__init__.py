"""Adapters that let third-party evaluation tools run grain_jax models."""
