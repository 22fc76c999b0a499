r"""``grain-jax-compile``: will the train step fit? AOT compile for a TPU slice on any machine.

    grain-jax-compile --config configs/grain_cc12m.py:variant=B/16 --topology v5e-256 [--config.key=value ...]

Prints compile time, memory per device (arguments, temporaries, total against the chip's HBM) and
FLOPs per step (``grain_jax.train.aot``); exits 1 when the step does not fit (``--hbm_gib``
overrides the chip's HBM). TPU topologies need the ``tpu-aot`` extra (libtpu), not a TPU.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "'cpu' or a TPU slice: v4-32, v5e-256, v5p-128, v6e-64, ...")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice; set config.dcn_mesh_shape to match).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Memory per device to check against (default: the chip's HBM).")
flags.mark_flags_as_required(["config", "topology"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from grain_jax.train import aot
    report = aot.compile_train_step(_CONFIG.value, aot.topology(_TOPOLOGY.value, _NUM_SLICES.value),
                                    hbm_bytes=None if _HBM_GIB.value is None else _HBM_GIB.value * aot.GIB)
    print(report.summary(), flush=True)
    return 0 if report.fits else 1


def run():
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
