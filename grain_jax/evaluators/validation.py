"""Validation-loss evaluator: the training losses on a prepared eval split.

Runs the train step's forward pass and loss (``inference.objective.forward_loss``, ``train=False``) on
``pipeline.make_eval_iterator`` batches; padding examples carry ``mask=False`` and are
excluded by the loss. Losses and accuracies are averaged over batches weighted by their
number of real examples (contrastive terms use in-batch negatives, so they depend on the
eval batch size). Metrics: ``val/loss/total``, ``val/loss/image_caption``, ``val/acc/...``.
With ``data.text_length_buckets`` the texts are cut to their bucket as in training (one compile per length).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from grain_jax.inference import to_host
from grain_jax.inference.objective import forward_loss, text_keys
from grain_jax.models import text_batching


class Evaluator:
    """In-training validation evaluator (``type="validation"`` in ``config.evals``).

    Args:
      data: the data config (docs/interfaces.md section 6; usually ``config.data``).
      split: defaults to ``data.eval_split``.
      loss: ``LossConfig`` kwargs (usually ``config.loss``).
      batch_size: global eval batch size.
      max_batches: stop after this many batches (None: the whole split).
    """

    def __init__(self, data: Mapping[str, Any], *, split: str | None = None, loss: Mapping[str, Any] | None = None,
                 batch_size: int = 64, max_batches: int | None = None):
        from grain_jax.losses import LossConfig
        self.data = data
        self.split = split
        self.loss_config = LossConfig(**dict(loss or {}))
        self.batch_size, self.max_batches = batch_size, max_batches
        self._step_fns: dict[tuple, Any] = {}

    def _step_fn(self, model: nn.Module, mean, std):
        key = (model, tuple(mean), tuple(std))
        if key not in self._step_fns:
            self._step_fns[key] = jax.jit(lambda params, batch: forward_loss(
                model, self.loss_config, params, batch, train=False, mean=mean, std=std)[1])
        return self._step_fns[key]

    def run(self, inference_model) -> Iterator[tuple[str, float]]:
        from grain_jax.data import pipeline

        spec = inference_model.spec
        model = inference_model.model
        budget = getattr(model, "description_budget", 1.0)
        # A batch over the description budget runs the model with every slot encoded (text_batching.fit_batch).
        steps = {True: self._step_fn(model, spec.mean, spec.std)}
        buckets, keys = self.data.get("text_length_buckets") or (), text_keys(model, self.loss_config)
        mesh = inference_model.mesh
        sums: dict[str, float] = {}
        total = 0
        iterator = pipeline.make_eval_iterator(self.data, self.split, global_batch_size=self.batch_size)
        for index, batch in enumerate(iterator):
            if self.max_batches is not None and index >= self.max_batches:
                break
            valid = int(np.sum(batch["mask"]))
            if jax.process_count() > 1:  # batches are per-process slices; losses are global means
                valid = int(np.sum(multihost_utils.process_allgather(np.int32(valid))))
            if valid == 0:
                continue
            batch, packed = text_batching.fit_batch(batch, buckets, keys, budget)
            if packed not in steps:
                steps[packed] = self._step_fn(model.every_description_slot(), spec.mean, spec.std)
            step = steps[packed]
            with nn.logical_axis_rules(inference_model.rules):
                if mesh is None:
                    metrics = step(inference_model.params, batch)
                else:
                    with jax.set_mesh(mesh):
                        metrics = step(inference_model.params, pipeline.to_global(batch, inference_model.batch_sharding))
            for key, value in to_host(metrics).items():
                if key.startswith(("loss/", "acc/")):
                    sums[key] = sums.get(key, 0.0) + float(value) * valid
            total += valid
        if total == 0:
            raise ValueError(f"validation: split {self.split or 'eval_split'} of {self.data.get('dir')} "
                             "has no examples")
        for key, value in sums.items():
            yield f"val/{key}", value / total
