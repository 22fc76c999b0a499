"""grain-jax-compile: the real train step compiled ahead of time, its memory per device and the fit check."""
import importlib.util
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

import _train_utils
from grain_jax import sharding
from grain_jax.train import aot, trainer


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    # The trainer tests' config and 8-device data-parallel mesh: the step comes from the compilation cache.
    return _train_utils.runlocal_config(str(tmp_path_factory.mktemp("unused")))


@pytest.fixture(scope="module")
def report(config):
    return aot.compile_train_step(config, "cpu")


def test_cpu_report_counts_every_sharded_argument(config, report):
    """Argument bytes per device = the state's shards + this device's batch rows + the rng key."""
    mesh = sharding.create_mesh(config.mesh_shape, devices=jax.devices())
    schedule = trainer.schedule_from_config(config, total_steps=config.total_steps, warmup_steps=0)  # shapes only
    _, _, abstract = aot.abstract_train_state(config, mesh, sharding.axis_rules(), schedule)
    state_bytes = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(abstract))
    rows, data = config.global_batch_size // 8, config.data
    batch_bytes = rows * (data.image_size ** 2 * 3 + data.caption_length * 4  # uint8 images
                          + data.max_boxes * (data.description_length * 4 + 4 * 4 + 1))
    assert report.num_devices == 8 and report.mesh_shape == {"data": 8, "fsdp": 1, "tensor": 1}
    assert report.argument_bytes == state_bytes + batch_bytes + 2 * 4
    assert report.alias_bytes == state_bytes  # the state is donated
    assert report.temp_bytes > 0 and report.flops_per_step > 0
    assert report.hbm_bytes is None and report.fits
    assert report.total_bytes == report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes


def test_tpu_slice_names_map_to_chip_grids():
    assert aot._grid(16, 3) == (2, 2, 4)  # v4-32: 16 chips
    assert aot._grid(64, 3) == (4, 4, 4)  # v5p-128
    assert aot._grid(4, 3) == (2, 2, 1)  # v4-8
    assert aot._grid(256, 2) == (16, 16)  # v5e-256
    assert aot._grid(8, 2) == (2, 4)
    with pytest.raises(ValueError, match="expected 'cpu' or a TPU slice"):
        aot.topology("v9-8")


def test_cli_exits_nonzero_when_the_step_does_not_fit(report):
    limit_gib = report.total_bytes / 2**30 / 2
    result = subprocess.run(
        [sys.executable, "-m", "grain_jax.cli.compile", f"--config={_train_utils.REPO}/grain_jax/configs/demo.py:runlocal",
         f"--config.total_steps={_train_utils.TOTAL_STEPS}", "--topology=cpu", f"--hbm_gib={limit_gib}"],
        cwd=_train_utils.REPO, env=_train_utils.subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cpu (8 x cpu, mesh {'data': 8, 'fsdp': 1, 'tensor': 1}), global batch 8" in result.stdout
    assert f"total {report.total_bytes / 2**30:.2f} GiB of {limit_gib:.1f} GiB HBM; DOES NOT FIT" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs the tpu-aot extra (libtpu, 684 MB installed; not installed by .ci/run)")
def test_tpu_topology_compiles_without_a_tpu(config, report):
    tpu = aot.compile_train_step(config, "v5e-8")
    assert tpu.num_devices == 8 and tpu.device_kind == "TPU v5 lite" and tpu.hbm_bytes == 16 * 2**30
    assert tpu.fits
    # Same sharded state on both platforms: the argument bytes agree (up to TPU tile padding).
    np.testing.assert_allclose(tpu.argument_bytes, report.argument_bytes, rtol=0.01)
    # Model FLOPs of the unpartitioned program, counted by the CPU client for the TPU one (the TPU plugin cannot
    # analyse unoptimised HLO); the two platforms lower a few ops differently (0.2% more FLOPs for v5e-8).
    assert report.flops_per_step > 0
    np.testing.assert_allclose(tpu.flops_per_step, report.flops_per_step, rtol=0.01)
