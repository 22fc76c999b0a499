r"""grain-jax-compile: will the train step fit? AOT compile for a TPU slice on any machine.

usage:
  grain-jax-compile --config CONFIG.py[:ARGS] --topology TOPOLOGY [--config.KEY=VALUE ...]

example:
  grain-jax-compile --config configs/grain_cc12m.py:variant=B/16 --topology v5e-256

Prints compile time, memory per device (arguments, temporaries, total against the chip's HBM) and
FLOPs per step (``grain_jax.train.aot``); exits 1 when the step does not fit (``--hbm_gib``
overrides the chip's HBM). TPU topologies need the ``tpu-aot`` extra (libtpu), not a TPU.
"""
import sys

from absl import flags
from ml_collections import config_flags

from grain_jax import cli
from grain_jax.cli import config_help

PROGRAM = "grain-jax-compile"


def _flags(argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "a training config file and its arguments (as for "
                                    "grain-jax-train)", flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("topology", None, "'cpu' or a TPU slice: v4-32, v5e-256, v5p-128, v6e-64, ...",
                        flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice; set config.dcn_mesh_shape to match)",
                         flag_values=fv)
    flags.DEFINE_float("hbm_gib", None, "memory per device to check against (default: the chip's HBM)",
                       flag_values=fv)
    return fv


def main(argv: list[str]) -> None:
    """Runs the binary on ``argv`` (program name first); exits 1 when the step does not fit."""
    fv = _flags(argv)
    cli.parse(argv, fv, __doc__, required=("topology",))
    config = config_help.from_flags(fv, argv)
    from grain_jax.train import aot
    report = aot.compile_train_step(config, aot.topology(fv.topology, fv.num_slices),
                                    hbm_bytes=None if fv.hbm_gib is None else fv.hbm_gib * aot.GIB)
    print(report.summary(), flush=True)
    if not report.fits:
        sys.exit(1)


def run(argv: list[str] | None = None) -> None:
    """Console script ``grain-jax-compile``."""
    cli.run(PROGRAM, main, argv)


if __name__ == "__main__":
    run()
