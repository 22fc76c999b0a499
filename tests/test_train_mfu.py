"""MFU's parts: model FLOPs per optimizer step (no remat recompute, not k x low with accumulation), peaks per device kind."""
import types

import jax
import jax.numpy as jnp
import pytest

import _train_utils
from grain_jax import sharding
from grain_jax.train import aot, metrics, trainer

B, D, K = 32, 64, 4


def test_model_flops_count_every_micro_batch_that_compiled_cost_analysis_misses():
    mesh = sharding.create_mesh((8, 1, 1))
    args = (jax.ShapeDtypeStruct((D, D), jnp.float32), jax.ShapeDtypeStruct((B, D), jnp.float32))

    def accumulated(w, x):  # K micro-batches in a scan, as step.py accumulates
        def body(total, micro):
            return total + jnp.sum(micro @ w), None
        return jax.lax.scan(body, 0.0, x.reshape(K, B // K, D))[0]

    assert metrics.model_flops_per_step(lambda w, x: jnp.sum(x @ w), args, mesh, ()) == pytest.approx(2 * B * D * D,
                                                                                                       rel=0.01)
    compiled = jax.jit(accumulated).lower(*args).compile()
    assert metrics.compiled_flops(compiled, 1) == pytest.approx(2 * B * D * D / K, rel=0.01)  # the loop body once


def test_trainer_flops_ignore_remat_accumulation_and_scan(tmp_path):
    def flops(remat="none", scan_layers=False, **overrides):
        config = _train_utils.runlocal_config(str(tmp_path), **overrides)
        config.model.remat_policy = remat
        config.model.scan_layers = scan_layers
        mesh = sharding.create_mesh(config.mesh_shape)
        rules = sharding.axis_rules()
        schedule = trainer.schedule_from_config(config, total_steps=10, warmup_steps=0)
        _, tx, abstract = aot.abstract_train_state(config, mesh, rules, schedule)
        return trainer.model_flops_per_step(config, tx, schedule, abstract, jax.tree.map(lambda x: x.sharding, abstract),
                                            sharding.batch_sharding(mesh, rules), mesh, rules)

    plain = flops()
    assert plain > 0
    assert flops(grad_accum_steps=2, remat="full") == plain
    assert flops(scan_layers=True) == plain  # a scanned block counts once per layer


@pytest.mark.parametrize("kind, platform, peak", [
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12), ("NVIDIA H100 PCIe", "gpu", 756e12), ("NVIDIA H100 NVL", "gpu", 835e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312e12), ("TPU v5 lite", "tpu", 197e12), ("TPU v5p", "tpu", 459e12),
    ("TPU v4", "tpu", 275e12)])
def test_peak_follows_the_device_kind(kind, platform, peak):
    devices = [types.SimpleNamespace(device_kind=kind, platform=platform, process_index=0)] * 2
    assert metrics.peak_flops(devices) == 2 * peak
