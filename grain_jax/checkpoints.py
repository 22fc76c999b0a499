"""On-disk checkpoint layout shared by training, inference and the converters.

    DIR/model_config.json        how to rebuild the model and its preprocessing (see ``ModelSpec``)
    DIR/checkpoints/<step>/      an orbax ``CheckpointManager`` step with Composite items:
        params                   the model parameters (always present)
        opt_state, extra, data   training only: optimizer state, {step, rng}, grain iterator state

Inference (``grain_jax.inference.load``), the converters and ``config.init_from``
only ever read the ``params`` item, so a converted checkpoint is just ``params``
plus ``model_config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from grain_jax.data import transforms
from grain_jax.models import scan

MODEL_CONFIG = "model_config.json"
CHECKPOINTS = "checkpoints"
CONSOLE_LOG = "out.log"  # a copy of the training binary's console, in the workdir
# Model overrides that are no longer model fields and never changed the parameters: a checkpoint that has
# them is read without them (text_length_buckets: now config.data.text_length_buckets, cut on the host).
RETIRED_OVERRIDES = ("text_length_buckets",)


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it like training did."""
    model_name: str
    model_overrides: dict = dataclasses.field(default_factory=dict)
    image_size: int = 224
    mean: Sequence[float] = transforms.IMAGENET_MEAN
    std: Sequence[float] = transforms.IMAGENET_STD
    caption_length: int = 77
    description_length: int = 77

    def create_model(self, **extra):
        from grain_jax.models import create_model
        return create_model(self.model_name, **{**self.model_overrides, **extra})


def write_model_spec(directory: str, spec: ModelSpec) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(spec), f, indent=2, default=list)


def read_model_spec(directory: str) -> ModelSpec:
    path = os.path.join(directory, MODEL_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} is not a grain_jax checkpoint directory")
    with open(path) as f:
        spec = ModelSpec(**json.load(f))
    retired = sorted(set(spec.model_overrides) & set(RETIRED_OVERRIDES))
    if retired:
        logging.info("%s: ignoring retired model option(s) %s (they never changed the parameters)", path, retired)
        spec.model_overrides = {k: v for k, v in spec.model_overrides.items() if k not in retired}
    return spec


def manager(directory: str, item_handlers: dict[str, Any] | None = None, **options: Any) -> ocp.CheckpointManager:
    """The CheckpointManager over ``DIR/checkpoints`` (options: CheckpointManagerOptions kwargs)."""
    return ocp.CheckpointManager(os.path.join(os.path.abspath(directory), CHECKPOINTS), item_handlers=item_handlers,
                                 options=ocp.CheckpointManagerOptions(**options))


def restore_params(directory: str, abstract_params: Any = None, step: int | None = None) -> Any:
    """Restores only the ``params`` item.

    Args:
      directory: a checkpoint DIR (see module docstring).
      abstract_params: optional pytree of ``jax.ShapeDtypeStruct`` (with shardings) to
        restore into, in either layer layout (``models.scan``: a checkpoint saved unrolled restores
        into a scanned model and back); ``None`` restores the saved tree onto this process's first
        device (whatever devices or process count wrote the checkpoint).
      step: defaults to the latest step.

    Raises:
      ValueError listing the parameters that are missing, unexpected or of another shape.
    """
    with manager(directory, item_handlers={"params": ocp.StandardCheckpointHandler()}, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint steps under {os.path.join(directory, CHECKPOINTS)}")
        saved = mngr.item_metadata(step)["params"].tree
        if abstract_params is None:  # orbax would place arrays on the saving run's devices, which may not exist here
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        else:
            target = scan.match_layout(abstract_params, saved, names=("model", f"checkpoint {directory}"))
            _check_fits(saved, target, directory)
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    if abstract_params is not None and target is not abstract_params:  # the other layout: convert on device
        shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
        params = jax.jit(lambda tree: scan.match_layout(tree, abstract_params), out_shardings=shardings)(params)
    return params


def _check_fits(saved: Any, target: Any, directory: str) -> None:
    """Raises ValueError naming every parameter of ``target`` the checkpoint's ``saved`` metadata lacks or
    holds with another shape, and every saved one ``target`` lacks."""
    saved, target = (traverse_util.flatten_dict(dict(tree), sep="/") for tree in (saved, target))
    problems = [f"{path} is missing from the checkpoint" for path in target if path not in saved]
    problems += [f"{path} is in the checkpoint but not in the model" for path in saved if path not in target]
    problems += [f"{path} has shape {tuple(saved[path].shape)} in the checkpoint, the model has {tuple(leaf.shape)}"
                 for path, leaf in target.items() if path in saved and tuple(saved[path].shape) != tuple(leaf.shape)]
    if problems:
        raise ValueError(f"the checkpoint {directory!r} does not fit the model:\n  " + "\n  ".join(problems[:20])
                         + (f"\n  (and {len(problems) - 20} more)" if len(problems) > 20 else ""))


def save_params(directory: str, params: Any, spec: ModelSpec, step: int = 0) -> None:
    """Writes a params-only checkpoint (what the converters produce)."""
    write_model_spec(directory, spec)
    with manager(directory) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mngr.wait_until_finished()
