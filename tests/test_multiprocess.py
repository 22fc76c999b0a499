"""Two processes on localhost (jax.distributed, CPU, 2 devices each) train like one process with the same global batch."""
import json
import os

import jax
import numpy as np
import portpicker

import _train_utils
from grain_jax import sharding
from grain_jax.data import pipeline
from grain_jax.data.synthetic import ensure_synthetic
from grain_jax.losses import LossConfig
from grain_jax.train import optimizer, state as state_lib, step as step_lib, trainer

STEPS = 3


def _one_process_losses(config) -> list[float]:
    """The trainer's recipe on a 4-device mesh in this process, fed both processes' data slices."""
    mesh = sharding.create_mesh((-1, 1, 1), devices=jax.devices()[:4])
    rules = sharding.axis_rules()
    schedule = optimizer.make_schedule(config, total_steps=STEPS, warmup_steps=config.warmup_steps)
    model = state_lib.build_model(config)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state, shardings, tx = state_lib.create_train_state(
        model, lambda p: optimizer.make_optimizer(config, p, schedule), config, mesh, rules, init_rng)
    batch_sh = state_lib.batch_sharding(mesh, rules)
    train_step = step_lib.make_train_step(model, LossConfig(**config.loss), tx, schedule,
                                          mean=config.data.mean, std=config.data.std)
    compiled = trainer.compile_train_step(train_step, state, shardings, batch_sh, mesh, rules, config)
    iterators = [pipeline.make_train_iterator(config.data, global_batch_size=config.global_batch_size,
                                              seed=config.seed, process_index=i, process_count=2) for i in range(2)]
    losses = []
    for _ in range(STEPS):
        halves = [next(it) for it in iterators]
        batch = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
        state, metrics = compiled(state, pipeline.to_global(batch, batch_sh), train_rng)
        losses.append(float(metrics["loss/total"]))
    return losses


def test_two_processes_match_one_process(tmp_path):
    config = _train_utils.runlocal_config(str(tmp_path / "data"), total_steps=STEPS)
    data_dir = ensure_synthetic(str(tmp_path / "data"), **config.synthetic)  # before the children race for it
    workdir = str(tmp_path / "run")
    port = portpicker.pick_unused_port()
    command = _train_utils.cli(workdir, str(tmp_path / "data"), f"--config.total_steps={STEPS}",
                               config_args="runlocal,evals=false")
    processes = [_train_utils.start(command, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                    JAX_PROCESS_ID=str(i)) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    assert "over 4 cpu devices in 2 process(es)" in outputs[0]

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))  # process 0 alone writes

    config.data.dir = data_dir
    np.testing.assert_allclose([m["loss/total"] for m in logged], _one_process_losses(config), rtol=1e-4)
