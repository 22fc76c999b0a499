r"""grain-jax-train: train GRAIN (or the CLIP baseline) from a config file, then evaluate it.

usage:
  grain-jax-train --config CONFIG.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...] [--verbosity=1]
  grain-jax-train --config CONFIG.py[:ARGS] --print_config

--config.KEY=VALUE overrides one key of the config (--print_config lists them all).

examples:
  grain-jax-train --config configs/demo.py --workdir workdirs/demo
  grain-jax-train --config configs/demo.py:model=clip --workdir workdirs/clip_demo --config.total_steps=600
  grain-jax-train --config configs/grain_cc12m.py:variant=B/16 --print_config

Rerun the same command with the same --workdir to resume from its newest checkpoint; a finished run is
not trained or evaluated again. Exit status: 0 done (or preempted and saved), 2 a mistake in the command
line or config, 1 a failure while running.

Multi-process launches are detected first (grain_jax.distributed: TPU VMs and pods, SLURM, or
JAX_COORDINATOR_ADDRESS (host:port of process 0) + JAX_NUM_PROCESSES + JAX_PROCESS_ID on every process),
and jax.distributed.initialize() is called for them.
"""
import os

from absl import flags, logging
from ml_collections import config_flags

from grain_jax import cli
from grain_jax.cli import config_help, console

PROGRAM = "grain-jax-train"


def _flags(argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    # sys_argv: config_flags finds the --config.KEY overrides in the argv being parsed, not in sys.argv.
    config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py) and its arguments after a colon, "
                                    "e.g. configs/demo.py:model=clip,runlocal", flag_values=fv, lock_config=True,
                                    sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics.jsonl, TensorBoard events, final_metrics.json "
                        "and out.log go", flag_values=fv)
    flags.DEFINE_bool("fresh_start", False, "train from scratch although WORKDIR has checkpoints that cannot be "
                      "used (by default that stops with an error)", flag_values=fv)
    flags.DEFINE_bool("print_config", False, "print every key of the config with its value (after overrides) "
                      "and exit", flag_values=fv)
    return fv


def _make_workdir(workdir: str) -> str:
    workdir = os.path.abspath(workdir)
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise console.UsageError(f"--workdir {workdir}: {existing} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise console.UsageError(f"--workdir {workdir}: cannot create it ({error.strerror})") from error
    return workdir


def main(argv: list[str]) -> None:
    """Runs the binary on ``argv`` (program name first)."""
    fv = _flags(argv)
    cli.parse(argv, fv, __doc__)
    config = config_help.from_flags(fv, argv)
    if fv.print_config:
        print(config_help.describe(config, config_help.spec_from_argv(argv)))
        return
    if not fv.workdir:
        raise console.UsageError("--workdir is required: the directory for checkpoints, logs and results")
    workdir = _make_workdir(fv.workdir)
    import jax
    from grain_jax import distributed
    launch = distributed.initialize()
    # Now on every process, and with the workdir's out.log on process 0.
    console.setup(fv.verbosity, workdir, 0 if launch.kwargs is None else jax.process_index())
    logging.info("multi-host start: %s", launch.description)
    from grain_jax.train.trainer import train_and_evaluate
    train_and_evaluate(config, workdir, fresh_start=fv.fresh_start)


def run(argv: list[str] | None = None) -> None:
    """Console script ``grain-jax-train``."""
    cli.run(PROGRAM, main, argv)


if __name__ == "__main__":
    run()
