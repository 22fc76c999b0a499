r"""Region-description negatives from each device's sub-batch only (the reference's behaviour).

The reference computes L_rd per GPU (16 GPUs x 128); ``groups`` sub-batches of the global
batch reproduce that on any topology. The default configs use the global batch instead.

    grain-jax-train --config configs/ablations/per_device_negatives.py:groups=16 --workdir DIR --config.data.dir=...

Arguments: ``groups`` (default 16), ``dataset`` (cc12m|cc3m), ``variant``, ``runlocal``.
"""
from grain_jax.configs.ablations import _base


def get_config(arg=None):
    args = _base.parse(arg, groups=16)
    config = _base.base_config(args)
    if args.runlocal:
        args.groups = min(args.groups, 2)  # the smoke batch is only 8
    config.loss.description_negatives = "per_device"
    config.loss.negative_groups = args.groups
    return config
