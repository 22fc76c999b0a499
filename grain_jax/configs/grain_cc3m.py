r"""GRAIN on CC3M: the CC12M experiment on the smaller corpus (same model, batch and schedule).

    grain-jax-train --config configs/grain_cc3m.py:variant=B/16 --workdir DIR --config.data.dir=CC3M_PREPARED_DIR

Arguments: as ``grain_cc12m.py`` (``variant``, ``runlocal``), plus ``model`` (grain|clip: the CLIP
baseline on CC3M).
"""
from grain_jax.configs import common, grain_cc12m


def get_config(arg=None):
    args = common.parse_arg(arg, variant="B/16", runlocal=False, model="grain")
    config = grain_cc12m.build(variant=args.variant, runlocal=args.runlocal, model=args.model)
    if not args.runlocal:
        # ~3.3 M pairs: an epoch is ~1.6 k steps at batch 2048, so evaluate and save more often.
        config.checkpoint_every_steps = 1000
        config.evals.val.every_steps = 1000
        config.evals.zeroshot.every_steps = 5000
    return config
