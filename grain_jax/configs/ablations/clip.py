r"""The CLIP baseline of an ablation table: CLS-token image embedding, image-caption loss only, same data,
batch and schedule as the GRAIN rows.

    python benchmarks/ablation.py --workdir DIR          # uses clip.py:dataset=demo
    grain-jax-train --config configs/ablations/clip.py:dataset=cc3m --workdir DIR --config.data.dir=...

Arguments: ``dataset`` (cc12m|cc3m|demo), ``variant``, ``runlocal``.
"""
from grain_jax.configs.ablations import _base


def get_config(arg=None):
    return _base.base_config(_base.parse(arg), model="clip")
