r"""Large contrastive batches: per-device memory and step time of dense / chunked / ring losses, side by side.

    python benchmarks/large_batch.py                                  # 8 fake CPU devices, loss step
    python benchmarks/large_batch.py --batch_sizes 512,2048,8192 --time_max_batch 2048
    # AOT for a TPU pod without a TPU (needs `pip install libtpu==0.0.42.1`): loss step per chip
    python benchmarks/large_batch.py --topology v5e:16x16 --batch_sizes 8192,32768 --time_max_batch 0
    # AOT of the whole B/16 train step per v5e chip, one line per (batch, impl, remat policy)
    python benchmarks/large_batch.py --topology v5e:16x16 --train_config grain_jax/configs/grain_cc12m.py:variant=B/16 \
        --batch_sizes 16384,32768 --impls dense,ring --remat_policies none,full
    # ... with GradCache over 2 micro-batches: add --grad_accum_steps 2

The loss step is ``value_and_grad(total_loss)`` with respect to GRAIN-shaped model
outputs (image / caption embeddings [B, D], region embeddings [B, Q, D], description
embeddings [B, M, D], boxes), i.e. L_ic, Hungarian matching, box losses and L_rd
with global negatives: the part of the train step whose memory grows as B^2. Memory
is the compiled ``memory_analysis()`` per device (temporaries, and temporaries +
arguments + outputs); time is the median of a few executed steps (only where the
devices are real or fake CPU ones, and B <= --time_max_batch). Times on a shared
CPU machine are only meaningful as ratios within one run.
"""
from __future__ import annotations

import importlib.util
import os
import time

# 8 fake devices when this runs on the CPU (no effect on TPU / GPU backends).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from grain_jax import models, sharding
from grain_jax.losses import LossConfig, total_loss

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["256", "1024", "4096"], "Global batch sizes.")
_IMPLS = flags.DEFINE_list("impls", ["dense", "chunked", "ring"], "loss.contrastive_impl values to compare.")
_CHUNKS = flags.DEFINE_integer("chunks", 8, "loss.contrastive_chunks for 'chunked'.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding width D (B/16: 512, L/14: 768).")
_QUERIES = flags.DEFINE_integer("queries", 5, "Region queries Q = description slots M.")
_TIME_MAX_BATCH = flags.DEFINE_integer("time_max_batch", 1024, "Execute and time only up to this batch.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
_MESH = flags.DEFINE_list("mesh_shape", ["-1", "1", "1"], "(data, fsdp, tensor) mesh over the devices.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile for a TPU topology instead, e.g. v5e:16x16 (AOT only).")
_TRAIN_CONFIG = flags.DEFINE_string("train_config", None,
                                    "With --topology: compile the whole train step of this config file[:args].")
_REMAT = flags.DEFINE_list("remat_policies", ["none"], "With --train_config: model.remat_policy values.")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", None, "With --train_config: GradCache micro-batches (default: the "
                              "config's).")

# MaxText's accelerator_to_spec_map: name -> (chip config, chips per host, wrap).
_TOPOLOGIES = {"v5e:16x16": ("default", (2, 2, 1), (True, True, False)), "v5e:4x4": ("default", (2, 2, 1), None),
               "v5e:8x16": ("default", (2, 2, 1), None), "v4:2x2x4": ("megacore", (2, 2, 1), None)}


def _devices() -> list:
    if not _TOPOLOGY.value:
        return jax.devices()
    from jax.experimental import topologies
    if _TOPOLOGY.value not in _TOPOLOGIES:
        raise ValueError(f"--topology must be one of {sorted(_TOPOLOGIES)}, got {_TOPOLOGY.value!r}")
    chip_config, per_host, wrap = _TOPOLOGIES[_TOPOLOGY.value]
    kwargs = {"wrap": wrap} if wrap else {}
    return topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu", chip_config_name=chip_config,
                                        chips_per_host_bounds=per_host, num_slices=1, **kwargs).devices


def _memory(compiled) -> tuple[float, float]:
    """(temporaries, temporaries + arguments + outputs - aliased) in GiB per device."""
    m = compiled.memory_analysis()
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return m.temp_size_in_bytes / 2**30, total / 2**30


def _loss_step_inputs(batch_size: int, mesh) -> tuple[dict, dict]:
    """Abstract GRAIN outputs and batch, batch-sharded over the mesh."""
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    q, d = _QUERIES.value, _DIM.value
    s = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    outputs = {"img/embedding": s((batch_size, d)), "txt/caption": s((batch_size, d)),
               "txt/descriptions": s((batch_size, q, d)), "dec/region_embeddings": s((batch_size, q, d)),
               "dec/boxes": s((batch_size, q, 4)),
               "logit_scale": jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))}
    return outputs, {"boxes": s((batch_size, q, 4)), "box_mask": s((batch_size, q), jnp.bool_)}


def _concrete(abstract: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def make(x):
        if x.dtype == jnp.bool_:
            value = rng.uniform(size=x.shape) < 0.8
        else:
            value = rng.uniform(0.1, 0.6, size=x.shape).astype(np.float32)
        return jax.device_put(value, x.sharding)
    return jax.tree.map(make, abstract)


def loss_step_rows(mesh, rules) -> None:
    can_run = not _TOPOLOGY.value
    print(f"loss step on {mesh.devices.size} x {mesh.devices.flat[0].device_kind}, D={_DIM.value}, "
          f"Q=M={_QUERIES.value}, chunks={_CHUNKS.value}")
    print(f"{'batch':>7} {'impl':>8} {'temp GiB/dev':>13} {'total GiB/dev':>14} {'step ms':>9} {'loss':>10}")
    for batch_size in (int(b) for b in _BATCH_SIZES.value):
        outputs, batch = _loss_step_inputs(batch_size, mesh)
        for impl in _IMPLS.value:
            config = LossConfig(contrastive_impl=impl, contrastive_chunks=_CHUNKS.value)
            step = jax.jit(jax.value_and_grad(lambda o, b: total_loss(o, b, config), has_aux=True))
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                compiled = step.lower(outputs, batch).compile()
            temp, total = _memory(compiled)
            step_ms, loss = "-", "-"
            if can_run and batch_size <= _TIME_MAX_BATCH.value:
                args = (_concrete(outputs, 0), _concrete(batch, 1))
                jax.block_until_ready(compiled(*args))
                times = []
                for _ in range(_STEPS.value):
                    start = time.perf_counter()
                    (value, _), _ = jax.block_until_ready(compiled(*args))
                    times.append(time.perf_counter() - start)
                step_ms, loss = f"{1000 * np.median(times):.0f}", f"{float(value):.5f}"
            print(f"{batch_size:>7} {impl:>8} {temp:>13.3f} {total:>14.3f} {step_ms:>9} {loss:>10}", flush=True)


def train_step_rows(mesh, rules) -> None:
    """AOT per-chip memory of the whole train step (no execution)."""
    from grain_jax.train import state as state_lib, step as step_lib, trainer
    path, _, arg = _TRAIN_CONFIG.value.partition(":")
    spec = importlib.util.spec_from_file_location("train_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"train step {_TRAIN_CONFIG.value} on {mesh.devices.size} x {mesh.devices.flat[0].device_kind}, "
          f"mesh {dict(mesh.shape)}"
          + (f", grad_accum_steps={_ACCUM.value}" if _ACCUM.value else ""))
    print(f"{'batch':>7} {'impl':>8} {'remat':>22} {'temp GiB/chip':>14} {'total GiB/chip':>15} {'compile s':>10}")
    for batch_size in (int(b) for b in _BATCH_SIZES.value):
        for remat in _REMAT.value:
            for impl in _IMPLS.value:
                config = module.get_config(arg or None)
                config.global_batch_size = batch_size
                config.model.remat_policy = remat
                config.loss.contrastive_impl = impl
                config.loss.contrastive_chunks = _CHUNKS.value
                if _ACCUM.value:
                    config.grad_accum_steps = _ACCUM.value
                schedule = trainer.schedule_from_config(config, total_steps=1000, warmup_steps=10)
                model = state_lib.build_model(config)
                boxed = models.abstract_params(model)
                unboxed = nn.meta.unbox(boxed)
                tx = trainer.optimizer_from_config(config, unboxed, schedule)
                shardings = state_lib.state_shardings(tx, unboxed, state_lib.param_shardings(boxed, mesh, rules),
                                                      mesh)
                state = state_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=unboxed,
                                             opt_state=jax.eval_shape(tx.init, unboxed))
                train_step = step_lib.make_train_step(model, LossConfig(**config.loss), tx, schedule,
                                                      int(config.get("grad_accum_steps", 1)),
                                                      mean=config.data.mean, std=config.data.std,
                                                      grad_reduce_dtype=config.get("grad_reduce_dtype", "compute"))
                start = time.perf_counter()
                compiled = trainer.compile_train_step(train_step, state, shardings,
                                                      sharding.batch_sharding(mesh, rules), mesh, rules, config)
                temp, total = _memory(compiled)
                print(f"{batch_size:>7} {impl:>8} {remat:>22} {temp:>14.2f} {total:>15.2f} "
                      f"{time.perf_counter() - start:>10.0f}", flush=True)


def main(argv):
    del argv
    mesh = sharding.create_mesh(tuple(int(x) for x in _MESH.value), devices=_devices())
    rules = sharding.axis_rules()
    if _TRAIN_CONFIG.value:
        if not _TOPOLOGY.value:
            raise ValueError("--train_config needs --topology (use benchmarks/train_step.py on real devices)")
        train_step_rows(mesh, rules)
    else:
        loss_step_rows(mesh, rules)


if __name__ == "__main__":
    app.run(main)
