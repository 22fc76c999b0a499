"""The evaluator contract (big_vision's ``config.evals``).

Each entry of ``config.evals`` is ``name -> {type, every_steps, prefix, **kwargs}``::

    config.evals = {
        "novel": dict(type="zeroshot", every_steps=500, datasets=["synthetic:novel"], synthetic_dir=...),
        "val": dict(type="validation", every_steps=500, data=config.data, loss=config.loss),
    }

``from_config`` turns it into ``[(name, evaluator, every_steps, prefix)]``; the trainer
calls ``evaluator.run(inference_model)`` every ``every_steps`` steps and logs
``prefix + metric`` for every ``(metric, value)`` it yields. Metric names carry their
type's namespace (``0shot/synthetic_novel/top1``, ``retrieval/coco_captions/img2txt_R@1``,
``val/loss``); the default prefix is ``"eval/"``.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

TYPES = {
    "zeroshot": "grain_jax.evaluators.zeroshot",
    "retrieval": "grain_jax.evaluators.retrieval",
    "validation": "grain_jax.evaluators.validation",
}
DEFAULT_PREFIX = "eval/"


def from_config(evals_config: Mapping[str, Mapping[str, Any]] | None) -> list[tuple[str, Any, int, str]]:
    """Builds the evaluators of ``config.evals`` (a dict / ConfigDict of dicts).

    Returns:
      ``[(name, evaluator, every_steps, prefix)]`` in config order; ``every_steps``
      <= 0 means "only at the end of training".
    """
    evaluators = []
    for name, cfg in (evals_config or {}).items():
        kwargs = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        eval_type = kwargs.pop("type", None)
        if eval_type not in TYPES:
            raise ValueError(f"config.evals[{name!r}]: type must be one of {sorted(TYPES)}, got {eval_type!r}")
        every_steps = int(kwargs.pop("every_steps", kwargs.pop("log_steps", 0)) or 0)
        prefix = kwargs.pop("prefix", DEFAULT_PREFIX)
        module = importlib.import_module(TYPES[eval_type])
        try:
            evaluator = module.Evaluator(**kwargs)
        except TypeError as e:
            raise ValueError(f"config.evals[{name!r}] ({eval_type}): {e}") from e
        evaluators.append((name, evaluator, every_steps, prefix))
    return evaluators
