r"""GradCache over an ``fsdp`` axis: reduce-scatter each micro-batch's gradients (what the step does) or accumulate
unreduced gradients and reduce once per step (the alternative), side by side on fake CPU devices.

    python benchmarks/grad_cache_fsdp.py --mesh_shape 2,4,1 --k 4

Prints, per device, the compiled step's temporaries and arguments (``memory_analysis``) and the floating-point
collectives inside and outside the micro-batch loops (count and bytes, from the compiled HLO). The alternative is
built by widening GradCache's gradient groups to the ``fsdp`` axis as well, so that each device accumulates the
whole gradient of its own rows, exactly as it does over ``data``, and by not sharding the accumulators.
"""
from __future__ import annotations

import collections
import functools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from grain_jax import batch as batch_lib, sharding  # noqa: E402
from grain_jax.configs import demo  # noqa: E402
from grain_jax import models  # noqa: E402
from grain_jax.inference.objective import model_outputs  # noqa: E402
from grain_jax.losses import LossConfig, total_loss  # noqa: E402
from grain_jax.train import grad_cache, hlo, state as state_lib, trainer  # noqa: E402

_MESH = flags.DEFINE_list("mesh_shape", ["2", "4", "1"], "(data, fsdp, tensor).")
_K = flags.DEFINE_integer("k", 4, "grad_accum_steps (micro-batches).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_MODEL = flags.DEFINE_string("model", "grain-tiny", "Registered model name.")


def _groups_over_every_batch_axis():
    """GradCache's groups over every batch mesh axis (``fsdp`` too), their parameters unsharded inside a group."""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    axes = tuple(sharding.mesh_axes("batch", mesh))
    inner_rules = tuple((name, grad_cache._without(mesh_axes, axes)) for name, mesh_axes in rules)
    return axes, int(np.prod([mesh.shape[axis] for axis in axes], dtype=int)), inner_rules


def main(argv):
    del argv
    config = demo.get_config("runlocal")
    config.model_name, config.global_batch_size = _MODEL.value, _BATCH.value
    mesh_shape = tuple(int(x) for x in _MESH.value)
    mesh = sharding.create_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    rules = sharding.axis_rules()
    model = state_lib.build_model(config)
    schedule = trainer.schedule_from_config(config, total_steps=10, warmup_steps=1)
    state, _, _ = state_lib.create_train_state(
        model, lambda p: trainer.optimizer_from_config(config, p, schedule), mesh, rules, jax.random.PRNGKey(0))
    data = config.data
    batch = jax.device_put(batch_lib.fake_batch(_BATCH.value, data.image_size, data.caption_length,
                                                data.description_length, data.max_boxes),
                           sharding.batch_sharding(mesh, rules))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    print(f"{_MODEL.value}: {param_bytes / 2**20:.1f} MiB of fp32 parameters; mesh (data, fsdp, tensor) = {mesh_shape}, "
          f"global batch {_BATCH.value}, k = {_K.value}; per device:")
    print(f"{'gradients reduced over fsdp':>28} {'args MiB':>9} {'temp MiB':>9} {'in loops (op: n x MiB)':>44} "
          f"{'after loops':>30}")
    apply_fn = functools.partial(model_outputs, model, mean=data.mean, std=data.std)
    loss_fn = functools.partial(total_loss, config=LossConfig(**config.loss))
    param_axes = nn.get_partition_spec(models.abstract_params(model))
    unsharded = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), state.params)
    default_groups = grad_cache._gradient_groups
    for label, groups, axes in (("per micro-batch (the step)", default_groups, param_axes),
                                ("once per step (unreduced)", _groups_over_every_batch_axis, unsharded)):
        grad_cache._gradient_groups = groups
        try:
            fn = jax.jit(grad_cache.make_gradient_fn(apply_fn, loss_fn, _K.value, axes))
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                compiled = fn.lower(state.params, batch, jax.random.PRNGKey(1)).compile()
        finally:
            grad_cache._gradient_groups = default_groups
        memory = compiled.memory_analysis()
        where = {True: collections.defaultdict(list), False: collections.defaultdict(list)}
        for c in hlo.float_collectives(compiled.as_text()):
            where[c.in_loop][c.op].append(c.bytes)
        summary = {in_loop: ", ".join(f"{op}: {len(b)} x {sum(b) / len(b) / 2**20:.2f}" for op, b in sorted(ops.items()))
                   for in_loop, ops in where.items()}
        print(f"{label:>28} {memory.argument_size_in_bytes / 2**20:>9.2f} {memory.temp_size_in_bytes / 2**20:>9.2f} "
              f"{summary[True]:>44} {summary[False]:>30}", flush=True)


if __name__ == "__main__":
    app.run(main)
