r"""The training binary: ``grain-jax-train --config configs/X.py[:args] --workdir DIR [--config.key=value ...]``.

Multi-process launches are detected first (``grain_jax.distributed``: TPU VMs and pods, SLURM,
or ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``
on every process), and ``jax.distributed.initialize()`` is called for them.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and model_config.json.")
_FRESH_START = flags.DEFINE_bool("fresh_start", False, "Train from scratch even though WORKDIR has checkpoints "
                                  "that cannot be used (by default that stops with an error).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    from grain_jax import distributed
    distributed.initialize()
    logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    from grain_jax.train.trainer import train_and_evaluate
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, fresh_start=_FRESH_START.value)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
