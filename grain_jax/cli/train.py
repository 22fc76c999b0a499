r"""The training binary: ``grain-jax-train --config configs/X.py[:args] --workdir DIR [--config.key=value ...]``.

Multi-process launches call ``jax.distributed.initialize()`` first: on TPU pods and under
SLURM it finds the coordinator and process ids itself; elsewhere set ``JAX_COORDINATOR_ADDRESS``
(host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every process.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and model_config.json.")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables that mean "this is one process of a multi-process job".
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _is_multi_process() -> bool:
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    return any(os.environ.get(name) for name in _MULTI_PROCESS_ENV if name != "SLURM_NTASKS")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    if _is_multi_process():
        explicit = {key: int(os.environ[name]) for key, name in (("num_processes", "JAX_NUM_PROCESSES"),
                                                                 ("process_id", "JAX_PROCESS_ID")) if name in os.environ}
        jax.distributed.initialize(**explicit)
    logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    from grain_jax.train.trainer import train_and_evaluate
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
