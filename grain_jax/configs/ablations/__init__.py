"""Ablations of the GRAIN experiment; each file changes one thing of ``_base.base_config``."""
