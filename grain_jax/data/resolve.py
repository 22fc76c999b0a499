"""Where a config's training records are: a prepared directory, or the embedded synthetic benchmark.

``data.dir`` names a directory written by grain-jax-prepare. A config that leaves it None and sets
``synthetic`` (``synthetic.ensure_synthetic``'s sizes: the demo and the runlocal variants) trains on the
embedded benchmark, generated on first use into the run's data cache and reused after.
"""
from __future__ import annotations

from typing import Any, Mapping

from grain_jax.data.synthetic import ensure_synthetic


def data_dir(directory: str | None, synthetic: Mapping[str, Any] | None, cache_dir: str) -> str:
    """``directory``, or when it is None the synthetic benchmark of sizes ``synthetic`` in ``cache_dir``.

    Raises:
      ValueError: naming ``--config.data.dir`` when neither is given.
    """
    if directory is not None:
        return directory
    if synthetic is None:
        raise ValueError("config.data.dir is not set: pass --config.data.dir=PREPARED_DIR "
                         "(a directory written by grain-jax-prepare)")
    # Every process generates (deterministically) into its own local disk, or into a shared one (written to a
    # temporary sibling and renamed into place); a no-op once the directory is complete.
    return ensure_synthetic(cache_dir, **synthetic)
