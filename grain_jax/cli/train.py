r"""grain-jax-train: train GRAIN (or the CLIP baseline) from a config file, then evaluate it.

usage:
  grain-jax-train --config CONFIG.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...] [--verbosity=1]
  grain-jax-train --config CONFIG.py[:ARGS] --print_config

examples:
  grain-jax-train --config configs/demo.py --workdir workdirs/demo
  grain-jax-train --config configs/demo.py:model=clip --workdir workdirs/clip_demo --config.total_steps=600
  grain-jax-train --config configs/grain_cc12m.py:variant=B/16 --print_config

flags:
  --config        a config file (configs/*.py) and its arguments after a colon (e.g. demo.py:model=clip,runlocal)
  --config.KEY=V  override one key of the config (--print_config lists them all)
  --workdir       where checkpoints, metrics.jsonl, TensorBoard events, final_metrics.json and out.log go
  --fresh_start   train from scratch although WORKDIR has checkpoints that cannot be used (by default
                  that stops with an error)
  --print_config  print every key of the config with its value (after overrides) and exit
  --verbosity     0: progress, evaluation and result lines; 1: also library logs (orbax, clu's parameter
                  table) and tracebacks
  --helpfull      every flag, including JAX's and absl's

Rerun the same command with the same --workdir to resume from its newest checkpoint; a finished run is
not trained or evaluated again. Exit status: 0 done (or preempted and saved), 2 a mistake in the command
line or config, 1 a failure while running.

Multi-process launches are detected first (grain_jax.distributed: TPU VMs and pods, SLURM, or
JAX_COORDINATOR_ADDRESS (host:port of process 0) + JAX_NUM_PROCESSES + JAX_PROCESS_ID on every process),
and jax.distributed.initialize() is called for them.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from grain_jax.cli import config_help, console

PROGRAM = "grain-jax-train"
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and model_config.json.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print every config key with its value and exit.")
_FRESH_START = flags.DEFINE_bool("fresh_start", False, "Train from scratch even though WORKDIR has checkpoints "
                                  "that cannot be used (by default that stops with an error).")


def _verbosity() -> int:
    return flags.FLAGS["verbosity"].value if flags.FLAGS.is_parsed() else 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with this binary's --help and one-line errors for flags and config files (exit 2)."""
    if any(arg in ("-h", "-?", "--help", "--helpshort") for arg in argv[1:]):
        print(__doc__.strip())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error).splitlines()[0]
        if message.startswith("flag --config="):  # the config file raised: say what it raised
            message = config_help.explain(config_help.spec_from_argv(argv), argv, error)
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as error:  # raised by config_flags
        message = config_help.explain(config_help.spec_from_argv(argv), argv, error)
    sys.exit(console.fail(PROGRAM, console.UsageError(message), 0))


def _config(argv: list[str]):
    """The config with its overrides applied; a missing file or key is one UsageError line."""
    spec = config_help.spec_from_argv(argv)
    if not spec:
        raise console.UsageError("--config is required, e.g. --config configs/demo.py (see --help)")
    try:
        config = _CONFIG.value
        config.keys()  # a file that failed to load gives an object that raises on first use
        return config
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as error:
        raise console.UsageError(config_help.explain(spec, argv, error)) from error


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


def main(argv):
    if len(argv) > 1:
        raise console.UsageError(f"unexpected arguments {argv[1:]} (flags are --name=value; see --help)")
    config = _config(sys.argv)
    if _PRINT_CONFIG.value:
        print(config_help.describe(config, config_help.spec_from_argv(sys.argv)))
        return
    if not _WORKDIR.value:
        raise console.UsageError("--workdir is required: the directory for checkpoints, logs and results")
    workdir = _make_workdir(_WORKDIR.value)
    import jax
    from grain_jax import distributed
    launch = distributed.initialize()
    # Before anything else touches the backends, whose start-up chatter then stays off the console.
    console.setup(_verbosity(), workdir, 0 if launch.kwargs is None else jax.process_index())
    logging.info("multi-host start: %s", launch.description)
    from grain_jax.train.trainer import train_and_evaluate
    train_and_evaluate(config, workdir, fresh_start=_FRESH_START.value)


def run():
    with console.one_line_errors(PROGRAM, _verbosity):
        app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
