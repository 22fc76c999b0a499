r"""GRAIN without the region-description loss ("no_word"): captions + boxes only.

    grain-jax-train --config configs/ablations/no_word.py:dataset=cc12m --workdir DIR --config.data.dir=...

Arguments: ``dataset`` (cc12m|cc3m), ``variant``, ``runlocal``.
"""
from grain_jax.configs.ablations import _base


def get_config(arg=None):
    config = _base.base_config(_base.parse(arg))
    config.loss.region_description = 0.0
    return config
