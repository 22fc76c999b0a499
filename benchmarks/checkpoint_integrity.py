r"""Cost of the checkpoint digests (grain_jax.train.integrity) next to the save and restore they guard.

    python benchmarks/checkpoint_integrity.py                          # GRAIN B/16 params + AdamW state
    python benchmarks/checkpoint_integrity.py --config=configs/demo.py --repeats=3

Builds the config's train-state shapes (params and optimizer moments, sharded like the trainer
does) filled with random values (real moments are not compressible zeros), then times, side by
side in one process: a full ``Checkpointer.save`` + wait (which includes computing the digests),
the digests alone, a full ``Checkpointer.restore`` (which includes verifying them) and the
verification alone. Goal: digests < 5% of the save time. On a shared machine the wall times
mostly measure the neighbours, so the CPU time of the whole process (all threads) is printed beside them.
"""
import tempfile
import time

import flax.linen as nn
import grain
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from grain_jax import models, sharding
from grain_jax.train import integrity, resume, state as state_lib, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grain_cc12m.py:variant=B/16",
                                          "Config whose train state to checkpoint.", lock_config=True)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves and restores timed (the median is reported).")
_DIR = flags.DEFINE_string("dir", None, "Where to write the checkpoints (default: a temporary directory).")


def _random_state(config, mesh, rules):
    """A TrainState of random values with the trainer's shapes and shardings, and its shardings."""
    model = state_lib.build_model(config)
    boxed = models.abstract_params(model)
    unboxed = nn.meta.unbox(boxed)
    schedule = trainer.schedule_from_config(config, total_steps=1000, warmup_steps=10)
    tx = trainer.optimizer_from_config(config, unboxed, schedule)
    shardings = state_lib.state_shardings(tx, unboxed, state_lib.param_shardings(boxed, mesh, rules), mesh)
    abstract = state_lib.TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=unboxed,
                                    opt_state=jax.eval_shape(tx.init, unboxed))
    rng = np.random.default_rng(0)

    def fill(leaf, sh):
        value = rng.standard_normal(leaf.shape, np.float32) if leaf.shape else np.zeros((), np.float32)
        return jax.device_put(value.astype(leaf.dtype), sh)

    return jax.tree.map(fill, abstract, shardings), shardings


def _timed(fn):
    """(wall seconds, CPU seconds of all this process's threads) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv):
    del argv
    config = _CONFIG.value
    mesh = sharding.create_mesh(config.mesh_shape, config.get("dcn_mesh_shape"))
    rules = sharding.axis_rules(config.get("sharding_rules") or ())
    state, shardings = _random_state(config, mesh, rules)
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    items = {"params": state.params, "opt_state": state.opt_state}
    record = integrity.digests(items)  # compile once, outside the timings
    workdir = _DIR.value or tempfile.mkdtemp(prefix="grain_jax_integrity_")
    ckpt = resume.Checkpointer(workdir, keep=2)
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    times = {"save": [], "digests": [], "restore": [], "verification": []}
    for repeat in range(_REPEATS.value):
        state = state.replace(step=jax.device_put(np.int32(repeat + 1), shardings.step))
        times["save"].append(_timed(lambda: (ckpt.save(state, jax.random.PRNGKey(0), data), ckpt.wait())))
        times["digests"].append(_timed(lambda: integrity.digests(items)))
        times["restore"].append(_timed(lambda: ckpt.restore(state, shardings, data)))
        times["verification"].append(_timed(lambda: integrity.verify(record, items, step=0)))
    ckpt.close()
    median = {name: np.median(np.array(values), axis=0) for name, values in times.items()}  # [wall, cpu]
    print(f"{config.model_name}: {nbytes / 2**30:.2f} GiB of params + optimizer state on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), median of {_REPEATS.value}; wall (CPU) seconds")
    for whole, part in (("save", "digests"), ("restore", "verification")):
        (wall, cpu), (part_wall, part_cpu) = median[whole], median[part]
        print(f"{whole} {wall:.2f}s ({cpu:.2f}s): {part} {part_wall:.3f}s ({part_cpu:.3f}s) = "
              f"{100 * part_wall / wall:.1f}% ({100 * part_cpu / cpu:.1f}%) of it")

if __name__ == "__main__":
    app.run(main)
