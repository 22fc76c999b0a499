r"""Train-step throughput: steps/s, examples/s and MFU of a config's model on this machine's devices.

    python benchmarks/train_step.py                                   # the demo model (configs/demo.py)
    python benchmarks/train_step.py --config=configs/demo.py:model=clip
    python benchmarks/train_step.py --config=configs/grain_cc12m.py:variant=B/16 --config.global_batch_size=256

Runs unchanged on CPU, GPU and TPU: the mesh, sharding and AOT-compiled step are the trainer's
own; the batch is a fixed random one of the config's shapes (no input pipeline in the loop).
MFU = compiled FLOPs per step / step time / peak FLOP/s (grain_jax.train.metrics); a CPU has no
stable peak, so on CPU only the achieved GFLOP/s is printed.
"""
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from grain_jax import batch as batch_lib, sharding
from grain_jax.losses import LossConfig
from grain_jax.train import metrics, state as state_lib, step as step_lib, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config whose model and batch to time.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")


def main(argv):
    del argv
    config = _CONFIG.value
    trainer.validate_config(config)
    mesh = sharding.create_mesh(config.mesh_shape, config.get("dcn_mesh_shape"))
    rules = sharding.axis_rules(config.get("sharding_rules") or ())
    schedule = trainer.schedule_from_config(config, total_steps=1000, warmup_steps=10)
    model = state_lib.build_model(config)
    state, shardings, tx = state_lib.create_train_state(
        model, lambda p: trainer.optimizer_from_config(config, p, schedule), mesh, rules, jax.random.PRNGKey(0))
    batch_sh = sharding.batch_sharding(mesh, rules)
    data = config.data
    start = time.perf_counter()
    compiled = trainer.compile_train_step(
        step_lib.make_train_step(model, LossConfig(**config.loss), tx, schedule,
                                 int(config.get("grad_accum_steps", 1)), mean=data.mean, std=data.std,
                                 grad_reduce_dtype=config.get("grad_reduce_dtype", "compute")),
        state, shardings, batch_sh, mesh, rules, config)
    compile_s = time.perf_counter() - start
    batch = batch_lib.fake_batch(config.global_batch_size, data.image_size, data.caption_length,
                                 data.description_length, data.max_boxes)
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    rng = jax.device_put(jax.random.PRNGKey(0), state_lib.replicated(mesh))

    for _ in range(2):
        state, out = compiled(state, batch, rng)
    jax.block_until_ready(out)
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, out = compiled(state, batch, rng)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)

    step_s = float(np.median(times))
    flops = trainer.model_flops_per_step(config, tx, schedule, state, shardings, batch_sh, mesh, rules)
    peak = metrics.peak_flops(jax.devices())
    print(f"{config.model_name} @ {data.image_size}px, global batch {config.global_batch_size}, "
          f"{state_lib.count_params(state.params) / 1e6:.2f} M params, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}, compute {config.dtype}")
    print(f"compile {compile_s:.1f} s | step {1000 * step_s:.1f} ms (median of {len(times)}) | "
          f"{1 / step_s:.2f} steps/s | {config.global_batch_size / step_s:.1f} examples/s | "
          f"{flops / 1e9:.2f} GFLOP/step | {flops / step_s / 1e9:.1f} GFLOP/s achieved | "
          + (f"peak {peak / 1e12:.3f} TFLOP/s | MFU {100 * flops / step_s / peak:.2f}%" if peak
             else "MFU: none on CPU (no stable peak)"))


if __name__ == "__main__":
    app.run(main)
