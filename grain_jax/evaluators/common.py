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

import jax

from grain_jax.data import images as images_lib

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
        every_steps = int(kwargs.pop("every_steps", 0) or 0)
        prefix = kwargs.pop("prefix", DEFAULT_PREFIX)
        module = importlib.import_module(TYPES[eval_type])
        try:
            evaluator = module.Evaluator(**kwargs)
        except TypeError as e:
            raise ValueError(f"config.evals[{name!r}] ({eval_type}): {e}") from e
        evaluators.append((name, evaluator, every_steps, prefix))
    return evaluators


def read_example(source, index: int, name: str, skipped: list[dict]):
    """``source[index]``, or None when its image cannot be decoded (truncated, empty, not an image):
    then ``{"path", "reason"}`` is appended to ``skipped`` (safe from grain's reader threads)."""
    try:
        return source[index]
    except images_lib.DECODE_ERRORS as e:
        describe = getattr(source, "describe", lambda i: f"{name} example {i}")
        skipped.append({"path": describe(index), "reason": f"{type(e).__name__}: {e}"})
        return None


def report_skipped(name: str, skipped: list[dict], evaluated: int) -> None:
    """One console line: how many images were skipped, beside the number evaluated, and which."""
    if skipped and jax.process_index() == 0:
        shown = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:10])
        more = f"; and {len(skipped) - 10} more (see the results JSON)" if len(skipped) > 10 else ""
        print(f"{name}: evaluated {evaluated} examples, skipped {len(skipped)} unreadable image(s): {shown}{more}",
              flush=True)
