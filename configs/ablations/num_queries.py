r"""Number of region queries (the paper uses 5, plus the global query).

    grain-jax-train --config configs/ablations/num_queries.py:n=10 --workdir DIR --config.data.dir=...

Arguments: ``n`` (documented: 1, 3, 5, 10), ``dataset`` (cc12m|cc3m), ``variant``, ``runlocal``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base  # noqa: E402


def get_config(arg=None):
    args = _base.parse(arg, n=5)
    config = _base.base_config(args)
    config.model.num_queries = args.n
    return config
