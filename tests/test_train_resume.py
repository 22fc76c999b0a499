"""Exact resume after SIGKILL and clean exit on SIGTERM, with the real ``grain-jax-train`` binary."""
import json
import os
import signal

import jax
import numpy as np
import psutil
import pytest

import _train_utils
from grain_jax import checkpoints
from grain_jax.train import trainer


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def _wait_for(process, text: str) -> list[str]:
    """Reads the child's output until a line contains ``text``; returns the lines read."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed; output:\n{''.join(lines)}")


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, data_cache):
    reference_dir, killed_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
    trainer.train_and_evaluate(_train_utils.runlocal_config(data_cache, checkpoint_every_steps=2), reference_dir)

    # Killed while decoding in 2 worker processes, resumed in-process: the data state is worker-count free.
    process = _train_utils.start(_train_utils.cli(killed_dir, data_cache, "--config.checkpoint_every_steps=2",
                                                  "--config.data.num_workers=2"))
    _wait_for(process, f"step 5/{_train_utils.TOTAL_STEPS}")
    workers = psutil.Process(process.pid).children(recursive=True)
    assert len(workers) >= 2  # the data workers (and multiprocessing's resource tracker)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    # The killed trainer's workers do not outlive it (loader.exit_with_parent).
    _, alive = psutil.wait_procs(workers, timeout=30)
    alive = [w for w in alive if "resource_tracker" not in " ".join(w.cmdline())]  # exits when its pipe closes
    assert not alive, f"data workers still running after the trainer was killed: {alive}"
    with checkpoints.manager(killed_dir, read_only=True) as mngr:
        interrupted_at = mngr.latest_step()
    assert interrupted_at is not None and interrupted_at < _train_utils.TOTAL_STEPS

    trainer.train_and_evaluate(_train_utils.runlocal_config(data_cache, checkpoint_every_steps=2), killed_dir)
    expected, resumed = checkpoints.restore_params(reference_dir), checkpoints.restore_params(killed_dir)

    # Rerunning a finished command trains and evaluates nothing, and leaves its results as they were.
    results = [os.path.join(reference_dir, name) for name in (trainer.FINAL_METRICS, "metrics.jsonl")]
    before = [open(path).read() for path in results]
    again = trainer.train_and_evaluate(_train_utils.runlocal_config(data_cache, checkpoint_every_steps=2),
                                       reference_dir)
    assert [open(path).read() for path in results] == before
    assert "loss/total" in again and again == {k: v for k, v in json.loads(before[0]).items() if k != "step"}
    leaves = jax.tree_util.tree_leaves_with_path(expected)
    for (path, want), got in zip(leaves, jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_sigterm_saves_at_the_next_step_and_exits_zero(tmp_path, data_cache):
    workdir = str(tmp_path)
    process = _train_utils.start(_train_utils.cli(workdir, data_cache, "--config.checkpoint_every_steps=1000"))
    output = "".join(_wait_for(process, f"step 2/{_train_utils.TOTAL_STEPS}"))
    process.send_signal(signal.SIGTERM)
    output += process.stdout.read()
    assert process.wait(timeout=120) == 0, output
    # The console: our lines once each, no orbax internals or parameter table; a copy in out.log.
    assert "array_metadata_store" not in output and "| Name" not in output, output
    progress = [line for line in output.splitlines() if line.startswith("step ")]
    assert progress and len(progress) == len(set(progress)), output
    assert "preempted: saved checkpoint at step" in open(os.path.join(workdir, "out.log")).read()
    assert "preempted: saved checkpoint at step" in output, output
    with checkpoints.manager(workdir, read_only=True) as mngr:
        saved = mngr.latest_step()
    assert saved is not None and 2 < saved < _train_utils.TOTAL_STEPS
    assert f"at step {saved} in" in output
    assert os.path.exists(os.path.join(workdir, checkpoints.MODEL_CONFIG))
