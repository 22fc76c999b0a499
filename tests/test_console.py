"""What a user sees: grain-jax-train's --help, --print_config and one-line errors (exact first lines and
exit codes), the console filter and out.log, and CPU throughput without a made-up MFU."""
import io
import json
import logging
import os
import subprocess
import sys

import jax
import pytest

import _train_utils
from grain_jax import checkpoints
from grain_jax.cli import console
from grain_jax.train import metrics

DEMO = "configs/demo.py"


def _train(*args: str, cwd: str = _train_utils.REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grain_jax.cli.train", *args], cwd=cwd,
                          env=_train_utils.subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, status, first_line", [
    (["--config", "configs/demo_typo.py", "--workdir", "{tmp}/w"], 2,
     "grain-jax-train: error: --config configs/demo_typo.py: no such file configs/demo_typo.py; "
     "did you mean configs/demo.py?"),
    (["--config", DEMO, "--workdir", "{tmp}/w", "--config.total_step=3"], 2,
     "grain-jax-train: error: --config.total_step: the config has no key 'total_step'; "
     "did you mean --config.total_steps?"),
    (["--config", DEMO, "--workdir", "{tmp}/w", "--config.model.remat_polcy=full"], 2,
     "grain-jax-train: error: --config.model.remat_polcy: config.model has no key 'remat_polcy'; "
     "did you mean --config.model.remat_policy?"),
    (["--config", DEMO, "--workdir", "{tmp}/w", "--config.model.text_length_buckets=(16,32)"], 2,
     "grain-jax-train: error: --config.model.text_length_buckets: this key is now --config.data.text_length_buckets"),
    (["--config", DEMO, "--workdir", "{tmp}/file/w"], 2,
     "grain-jax-train: error: --workdir {tmp}/file/w: {tmp}/file is a file, not a directory"),
    (["--config", f"{DEMO}:model=clop", "--workdir", "{tmp}/w"], 2,
     f"grain-jax-train: error: --config {DEMO}:model=clop: get_config failed: ValueError: "
     "model must be one of ['clip', 'grain'], got 'clop'"),
    (["--config", DEMO], 2,
     "grain-jax-train: error: --workdir is required: the directory for checkpoints, logs and results"),
    (["--config", DEMO, "--workdr={tmp}/w"], 2,
     "grain-jax-train: error: Unknown command line flag 'workdr'. Did you mean: workdir ?"),
])
def test_train_mistakes_end_in_one_line(tmp_path, args, status, first_line):
    (tmp_path / "file").write_text("not a directory")
    result = _train(*(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == status, result.stderr
    assert result.stderr.splitlines() == [first_line.format(tmp=tmp_path)], result.stderr
    assert not (tmp_path / "w").exists()  # failed before doing anything


def test_train_help_and_print_config():
    result = _train("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("grain-jax-train: train GRAIN")
    for text in ("--config", "--workdir", "--print_config", "--verbosity", "grain-jax-train --config configs/demo.py"):
        assert text in result.stdout
    result = _train("--config", f"{DEMO}:runlocal", "--print_config", "--config.lr=0.01")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"# {DEMO}:runlocal: every key and its value; override any with --config.KEY=VALUE"
    for line in ("total_steps = 4", "lr = 0.01", "model_name = 'grain-tiny'", "data.image_size = 32"):
        assert line in lines


def test_a_failure_while_running_is_one_line_with_the_traceback_in_out_log(tmp_path):
    args = ["--config", f"{DEMO}:runlocal", "--workdir", str(tmp_path), f"--config.data.dir={tmp_path}/missing"]
    quiet, loud = _train(*args), _train(*args, "--verbosity=1")
    assert quiet.returncode == loud.returncode == 1
    last = quiet.stderr.splitlines()[-1]
    assert last.startswith("grain-jax-train: error: ") and last.endswith(f"({console.TRACEBACK_HINT})"), quiet.stderr
    assert "Traceback" not in quiet.stdout + quiet.stderr
    assert "Traceback" in loud.stderr
    assert "Traceback" in (tmp_path / checkpoints.CONSOLE_LOG).read_text()


def _record(name: str, level: int, pathname: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_console_filter_keeps_our_lines_and_hides_library_chatter():
    ours = os.path.join(os.path.dirname(console.__file__), "..", "train", "trainer.py")
    ours = os.path.abspath(ours)
    orbax = "/site-packages/orbax/checkpoint/async_checkpointer.py"
    default, verbose, worker = (console._ConsoleFilter(0, 0), console._ConsoleFilter(1, 0),
                                console._ConsoleFilter(0, 1))
    assert default.filter(_record("absl", logging.INFO, ours))
    assert not default.filter(_record("absl", logging.INFO, orbax))
    assert not default.filter(_record("absl", logging.WARNING, orbax))
    assert default.filter(_record("absl", logging.ERROR, orbax))
    assert default.filter(_record("jax._src.xla_bridge", logging.WARNING, "/x/jax/_src/xla_bridge.py"))
    assert not default.filter(_record("jax._src.xla_bridge", logging.INFO, "/x/jax/_src/xla_bridge.py"))
    assert verbose.filter(_record("absl", logging.INFO, orbax))
    assert not worker.filter(_record("absl", logging.INFO, ours))  # progress lines from process 0 only
    assert worker.filter(_record("absl", logging.WARNING, ours))
    formatter = console._ConsoleFormatter()
    assert formatter.format(_record("absl", logging.INFO, ours)) == "message"
    assert formatter.format(_record("absl", logging.WARNING, ours)) == "WARNING: message"


def test_tee_copies_the_console():
    screen, copy = io.StringIO(), io.StringIO()
    tee = console._Tee(screen, copy)
    print("step 1/4", file=tee)
    assert screen.getvalue() == copy.getvalue() == "step 1/4\n"


def test_cpu_throughput_reports_flops_not_mfu():
    assert metrics.peak_flops(jax.devices()) is None
    throughput = metrics.Throughput(total_steps=10, global_batch_size=8, flops_per_step=2e9, peak=None,
                                    first_step=0)
    measured = throughput.measure(2)
    assert "perf/mfu" not in measured
    assert measured["perf/flops_per_s"] == pytest.approx(2e9 / measured["perf/step_time_s"])
    line = metrics.console_line(2, 10, {"loss/total": 1.0, **measured})
    assert "MFU" not in line and "GFLOP/s" in line
    with_peak = metrics.console_line(2, 10, {**measured, "perf/mfu": 0.25})
    assert "MFU 25.00%" in with_peak and "GFLOP/s" not in with_peak


def test_grouped_lines_and_last_logged(tmp_path):
    text = metrics.grouped_lines({"eval/0shot/novel/top1": 0.1, "eval/0shot/novel/top5": 0.5,
                                  "eval/0shot/novel/alpha0.5/top1": 0.2})
    assert text.splitlines() == ["  eval/0shot/novel           top1 0.1 | top5 0.5",
                                 "  eval/0shot/novel/alpha0.5  top1 0.2"]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"step": 2, "loss/total": 3.0}, {"step": 4, "loss/total": 2.0}, {"step": 4, "eval/x/top1": 0.5},
        {"step": 6, "loss/total": 1.0}]) + "\n")
    assert metrics.last_logged(str(path), 4) == {"loss/total": 2.0}
    assert metrics.last_logged(str(tmp_path / "none.jsonl"), 4) == {}
