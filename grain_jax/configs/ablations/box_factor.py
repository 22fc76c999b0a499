r"""The reference code's box-loss factor 1.5 (``/(len(weight_dict)/3)`` in its box_utils; the paper says 1).

    grain-jax-train --config configs/ablations/box_factor.py:factor=1.5 --workdir DIR --config.data.dir=...

Arguments: ``factor`` (default 1.5), ``dataset`` (cc12m|cc3m), ``variant``, ``runlocal``.
"""
from grain_jax.configs.ablations import _base


def get_config(arg=None):
    args = _base.parse(arg, factor=1.5)
    config = _base.base_config(args)
    config.loss.box_factor = args.factor
    return config
