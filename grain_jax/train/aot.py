"""Ahead-of-time compile of the real train step for a device topology that is not here.

``compile_train_step(config, topology)`` builds the trainer's model, optimizer, mesh and
shardings over the *target* devices, lowers and compiles the same step function
``grain-jax-train`` runs, and reports its per-chip memory and FLOPs (as MaxText's
``train_compile`` does). TPU topologies (``v5e-256``, ``v4-32``, ``v5p-128``, ``v6e-64`` …) come
from ``jax.experimental.topologies.get_topology_desc`` and need libtpu (the ``tpu-aot``
extra), not a TPU; ``cpu`` compiles for this machine's (fake) CPU devices. Texts are at the config's
full lengths: with ``data.text_length_buckets`` the trainer also runs steps compiled for shorter texts,
which need less memory, so the report is the worst case.

The binary is ``grain-jax-compile`` (``grain_jax/cli/compile.py``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time

import flax.linen as nn
import jax
import ml_collections

from grain_jax import models, sharding
from grain_jax.train import optimizer, state as state_lib, step as step_lib, trainer

GIB = 2**30

# TPU generation -> (topology prefix, chip config, dims of the chip grid, HBM bytes per chip, TensorCores per chip).
# v4 and v5p names count TensorCores (2 per chip, "megacore"), v5e and v6e count chips.
_TPU_GENERATIONS = {
    "v4": ("v4", "megacore", 3, 32 * GIB, 2),
    "v5p": ("v5p", "megacore", 3, 95 * GIB, 2),
    "v5e": ("v5e", "default", 2, 16 * GIB, 1),
    "v6e": ("v6e", "default", 2, 32 * GIB, 1),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: tuple
    hbm_bytes: float | None  # per device; None = unknown (CPU)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Chip grid of a slice: ascending powers of two (v5e-256 -> 16x16, v4-32's 16 chips -> 2x2x4)."""
    shape = [1] * dims
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    shape = sorted(shape)
    if math.prod(shape) != chips:
        raise ValueError(f"{chips} chips do not form a power-of-two slice")
    return tuple(shape[shape.count(1):] + [1] * shape.count(1))  # 1s last: 2x2x1


def topology(name: str, num_slices: int = 1) -> Topology:
    """``cpu`` (this process's devices) or a TPU slice name like ``v5e-256`` (needs libtpu, not a TPU)."""
    if name == "cpu":
        return Topology("cpu", tuple(jax.devices()), None)
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if match is None:
        raise ValueError(f"--topology={name!r}: expected 'cpu' or a TPU slice like "
                         f"{', '.join(g + '-64' for g in _TPU_GENERATIONS)}")
    prefix, chip_config, dims, hbm, cores = _TPU_GENERATIONS[match.group(1)]
    chips = int(match.group(2)) // cores
    grid = _grid(chips, dims)
    from jax.experimental import topologies
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{prefix}:{'x'.join(map(str, grid))}", chip_config_name=chip_config,
            chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
    except Exception as error:  # the TPU PJRT plugin missing or refusing the topology
        hint = ("another process holds libtpu (any jax process without JAX_PLATFORMS=cpu loads it); an AOT compile "
                "uses no TPU, so run it with ALLOW_MULTIPLE_LIBTPU_LOAD=1" if "lockfile" in str(error)
                else "install the TPU compiler with: pip install -e '.[tpu-aot]'")
        raise RuntimeError(f"cannot describe TPU topology {name} ({type(error).__name__}: {error}); {hint}") from error
    return Topology(name if num_slices == 1 else f"{num_slices}x{name}", tuple(description.devices), float(hbm))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-device memory (bytes) and whole-step FLOPs of one compiled train step."""
    topology: str
    device_kind: str
    num_devices: int
    mesh_shape: dict
    global_batch_size: int
    compile_s: float
    argument_bytes: float
    output_bytes: float
    temp_bytes: float
    alias_bytes: float
    hbm_bytes: float | None
    flops_per_step: float  # model FLOPs (trainer.model_flops_per_step: no remat recompute), all devices
    sharding_excess: float  # params + optimizer bytes per device over fully sharded (sharding.sharding_excess)
    text_lengths: tuple[int, int] = (77, 77)  # (caption, description) tokens the step was compiled for
    text_length_buckets: tuple[int, ...] = ()  # config.data.text_length_buckets: shorter steps the trainer may run

    @property
    def total_bytes(self) -> float:
        """Peak per device as MaxText counts it: arguments + outputs - donated (aliased) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

    def summary(self) -> str:
        hbm = f" of {self.hbm_bytes / GIB:.1f} GiB HBM" if self.hbm_bytes else ""
        verdict = "" if self.hbm_bytes is None else ("; fits" if self.fits else "; DOES NOT FIT")
        texts = (f"; texts at their full {self.text_lengths[0]} / {self.text_lengths[1]} tokens, the worst case of "
                 f"data.text_length_buckets {self.text_length_buckets}" if self.text_length_buckets else "")
        return (f"{self.topology} ({self.num_devices} x {self.device_kind}, mesh {self.mesh_shape}), global batch "
                f"{self.global_batch_size}: compiled in {self.compile_s:.1f}s; per device: arguments "
                f"{self.argument_bytes / GIB:.2f} GiB, temporaries {self.temp_bytes / GIB:.2f} GiB, total "
                f"{self.total_bytes / GIB:.2f} GiB{hbm}{verdict}; {self.flops_per_step / 1e12:.4g} TFLOPs per step; "
                f"state {100 * self.sharding_excess:.1f}% over fully sharded{texts}")


def abstract_train_state(config: ml_collections.ConfigDict, mesh, rules: tuple, schedule):
    """``(model, tx, abstract state with shardings)``: the trainer's state, without allocating it."""
    model = state_lib.build_model(config)
    boxed = models.abstract_params(model)
    unboxed = nn.meta.unbox(boxed)
    tx = trainer.optimizer_from_config(config, unboxed, schedule)
    shardings = state_lib.state_shardings(tx, unboxed, state_lib.param_shardings(boxed, mesh, rules), mesh)
    abstract = jax.eval_shape(lambda params: state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                                                                  params=params, opt_state=tx.init(params)), unboxed)
    return model, tx, sharding.abstract_arrays(abstract, shardings)


def compile_train_step(config: ml_collections.ConfigDict, target: Topology | str, *,
                       num_train_examples: int = 10_000_000, hbm_bytes: float | None = None) -> CompileReport:
    """Compiles ``grain-jax-train``'s step for ``config`` on ``target`` and reports memory and FLOPs.

    ``num_train_examples`` only sets the schedule's constants (epoch-based durations); memory and
    FLOPs do not depend on it.
    """
    from grain_jax.losses import LossConfig
    target = topology(target) if isinstance(target, str) else target
    devices = list(target.devices)
    trainer.validate_config(config, num_devices=len(devices))
    mesh = sharding.create_mesh(config.mesh_shape, config.get("dcn_mesh_shape"), devices=devices)
    rules = sharding.axis_rules(config.get("sharding_rules") or ())
    sizes = dict(num_train_examples=num_train_examples, global_batch_size=config.global_batch_size)
    schedule = trainer.schedule_from_config(
        config, total_steps=optimizer.steps_from_duration(config, "total", **sizes),
        warmup_steps=optimizer.steps_from_duration(config, "warmup", default=0, **sizes))
    model, tx, abstract = abstract_train_state(config, mesh, rules, schedule)
    # The worst case of the steps the trainer may run: every description slot encoded (a batch over
    # model.description_budget; the same step as without packing).
    train_step = step_lib.make_train_step(model.every_description_slot(), LossConfig(**config.loss), tx, schedule,
                                          int(config.get("grad_accum_steps", 1)), mean=config.data.mean,
                                          std=config.data.std,
                                          grad_reduce_dtype=config.get("grad_reduce_dtype", "compute"))
    shardings, batch_sh = jax.tree.map(lambda x: x.sharding, abstract), sharding.batch_sharding(mesh, rules)
    start = time.perf_counter()
    compiled = trainer.compile_train_step(train_step, abstract, shardings, batch_sh, mesh, rules, config)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return CompileReport(
        topology=target.name, device_kind=devices[0].device_kind, num_devices=len(devices),
        mesh_shape=dict(mesh.shape), global_batch_size=config.global_batch_size, compile_s=seconds,
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        hbm_bytes=target.hbm_bytes if hbm_bytes is None else hbm_bytes,
        flops_per_step=trainer.model_flops_per_step(config, tx, schedule, abstract, shardings, batch_sh, mesh, rules),
        sharding_excess=sharding.sharding_excess({"params": abstract.params, "opt_state": abstract.opt_state})[0],
        text_lengths=(config.data.caption_length, config.data.description_length),
        text_length_buckets=tuple(config.data.get("text_length_buckets") or ()))
