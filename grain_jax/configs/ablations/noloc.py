r"""GRAIN without the box loss ("noloc"): region-description matching still uses the (untrained) boxes.

    grain-jax-train --config configs/ablations/noloc.py:dataset=cc12m --workdir DIR --config.data.dir=...

Arguments: ``dataset`` (cc12m|cc3m), ``variant``, ``runlocal``.
"""
from grain_jax.configs.ablations import _base


def get_config(arg=None):
    config = _base.base_config(_base.parse(arg))
    config.loss.box_l1 = 0.0
    config.loss.box_giou = 0.0
    return config
