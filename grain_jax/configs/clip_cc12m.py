r"""The CLIP baseline on CC12M: CLS-token image embedding, image-caption loss only, same data and schedule.

    grain-jax-train --config configs/clip_cc12m.py:variant=B/16 --workdir DIR --config.data.dir=CC12M_PREPARED_DIR

Arguments: as ``grain_cc12m.py`` (``variant``, ``runlocal``). Descriptions and boxes in the
records are simply not used (the loss only has the image-caption term for CLIP outputs).
"""
from grain_jax.configs import common, grain_cc12m


def get_config(arg=None):
    args = common.parse_arg(arg, variant="B/16", runlocal=False)
    return grain_cc12m.build(variant=args.variant, runlocal=args.runlocal, model="clip")
