r"""Cost of the checkpoint digests (grain_jax.train.integrity) next to the save and restore they guard.

    python benchmarks/checkpoint_integrity.py                          # GRAIN B/16 params + AdamW state
    python benchmarks/checkpoint_integrity.py --config=configs/demo.py --repeats=3

Builds the config's train-state shapes (params and optimizer moments, sharded like the trainer
does) filled with random values (real moments are not compressible zeros), then times, side by
side in one process: a full ``Checkpointer.save`` + wait (which includes computing the digests),
the digests alone, a full ``Checkpointer.restore`` (which includes verifying them) and the
verification alone. Goal: digests < 5% of the save time.
"""
import statistics
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
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


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
    saves, digest_times, restores, verify_times = [], [], [], []
    for repeat in range(_REPEATS.value):
        state = state.replace(step=jax.device_put(np.int32(repeat + 1), shardings.step))
        saves.append(_timed(lambda: (ckpt.save(state, jax.random.PRNGKey(0), data), ckpt.wait()))[0])
        digest_times.append(_timed(lambda: integrity.digests(items))[0])
        restores.append(_timed(lambda: ckpt.restore(state, shardings, data))[0])
        verify_times.append(_timed(lambda: integrity.verify(record, items, step=0))[0])
    ckpt.close()
    save, digest = statistics.median(saves), statistics.median(digest_times)
    restore, verify = statistics.median(restores), statistics.median(verify_times)
    print(f"{config.model_name}: {nbytes / 2**30:.2f} GiB of params + optimizer state on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), median of {_REPEATS.value}")
    print(f"save {save:.2f}s (digests {digest:.3f}s = {100 * digest / save:.1f}% of it); "
          f"restore {restore:.2f}s (verification {verify:.3f}s = {100 * verify / restore:.1f}% of it)")


if __name__ == "__main__":
    app.run(main)
