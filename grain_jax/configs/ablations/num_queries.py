r"""Number of region queries (the paper uses 5, plus the global query).

    grain-jax-train --config configs/ablations/num_queries.py:n=10 --workdir DIR --config.data.dir=...

Arguments: ``n`` (documented: 1, 3, 5, 10), ``dataset`` (cc12m|cc3m), ``variant``, ``runlocal``.
"""
from grain_jax.configs.ablations import _base


def get_config(arg=None):
    args = _base.parse(arg, n=5)
    config = _base.base_config(args)
    config.model.num_queries = args.n
    return config
