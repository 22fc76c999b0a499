"""benchmarks/ablation.py without training: every run's config loads, the table's statistics, the README block."""
import argparse
import importlib.util
import os

import numpy as np
import pytest

import _train_utils
from grain_jax.evaluators import zeroshot
from grain_jax.train import trainer


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", os.path.join(_train_utils.REPO, "benchmarks", "ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _ablation()


@pytest.mark.parametrize("name", list(ablation.RUNS))
def test_every_run_is_a_demo_scale_config(name):
    path, _, arg = ablation.RUNS[name][0].partition(":")
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(_train_utils.REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    trainer.validate_config(config, num_devices=1)
    assert (config.total_steps, config.global_batch_size, config.data.image_size) == (300, 32, 64)
    assert config.synthetic is not None  # the embedded benchmark
    assert config.model_name == ("clip-tiny" if name == "clip" else "grain-tiny")


def test_table_reports_mean_and_sample_std_over_seeds():
    seen, novel = ablation.COLUMNS[0][1], ablation.COLUMNS[1][1]
    results = {"grain": [{seen: 0.40, novel: 0.10}, {seen: 0.50, novel: 0.20}, {seen: 0.45, novel: 0.30}],
               "clip": [{seen: 0.60, novel: 0.05}, {seen: 0.50, novel: 0.15}, {seen: 0.55, novel: 0.10}]}
    lines = ablation.table(results).splitlines()
    assert lines[0] == "| run | " + " | ".join(c for c, _ in ablation.COLUMNS) + " |"
    grain = lines[2].split(" | ")
    assert grain[0] == "| " + ablation.RUNS["grain"][1]
    assert grain[1:3] == [f"45.0 ± {np.std([40, 50, 45], ddof=1):.1f}", "20.0 ± 10.0"]
    assert grain[3] == "–"  # a column no run reported
    assert "mean ± std over 3 seed(s)" in lines[-1]


def test_name_free_columns_read_the_evaluator_keys_and_older_runs_show_a_dash():
    columns = dict(ablation.COLUMNS)
    key = columns["novel, names → object"]
    assert key == "eval/0shot/synthetic_novel/" + zeroshot.NAME_FREE + "top1"
    assert columns["novel α=0.5, names → object"] == "eval/0shot/synthetic_novel/name_free/alpha0.5/top1"
    seen = ablation.COLUMNS[0][1]
    results = {"grain": [{seen: 0.4, key: 0.3}, {seen: 0.5, key: 0.5}],  # evaluated with name_free/ metrics
               "clip": [{seen: 0.6}, {seen: 0.5}]}  # final_metrics.json written before they existed
    index = [c for c, _ in ablation.COLUMNS].index("novel, names → object") + 1
    lines = ablation.table(results).splitlines()
    assert lines[2].split(" | ")[index] == f"40.0 ± {np.std([30, 50], ddof=1):.1f}"
    assert lines[3].split(" | ")[index] == "–"


def test_readme_block_is_replaced_and_figures_copied(tmp_path):
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- ablation:begin -->\nold table\n<!-- ablation:end -->\nafter\n")
    figures = []
    for name in ("ablation.png", "curves.png"):
        (tmp_path / name).write_bytes(name.encode())
        figures.append(str(tmp_path / name))
    ablation.update_readme(str(readme), "| new | table |", tuple(figures))
    assert readme.read_text() == ("before\n<!-- ablation:begin -->\n| new | table |\n\n![ablation.png](docs/ablation.png)\n"
                                  "![ablation_curves.png](docs/ablation_curves.png)\n<!-- ablation:end -->\nafter\n")
    assert (tmp_path / "docs" / "ablation_curves.png").read_bytes() == b"curves.png"
    readme.write_text("no block")
    with pytest.raises(SystemExit, match="has no <!-- ablation:begin --> ... <!-- ablation:end --> block"):
        ablation.update_readme(str(readme), "x", tuple(figures))


def test_unknown_runs_are_refused(capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--workdir", "unused", "--runs", "grain,glip"])
    assert "unknown runs ['glip']" in capsys.readouterr().err


def test_relative_workdir_is_resolved_against_the_callers_directory(tmp_path, monkeypatch):
    # The trainer runs in the repository root; a relative --workdir once sent the runs there while the
    # script looked for their results under the caller's directory.
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(workdir="runs", steps=None, override=["--config.warmup_steps=60"])
    command = ablation.train_command("grain", 2, args)
    flags = dict(arg.split("=", 1) for arg in command if arg.startswith("--config.") and "dir=" in arg)
    assert command[command.index("--workdir") + 1] == str(tmp_path / "runs" / "grain" / "seed2")
    assert flags == {"--config.data_cache_dir": str(tmp_path / "runs" / "data_holistic"),
                     "--config.compilation_cache_dir": str(tmp_path / "runs" / "compilation_cache" / "grain")}
    assert command[-1] == "--config.warmup_steps=60"
    assert ablation.run_dir("grain", 2, args) == str(tmp_path / "runs" / "grain" / "seed2")
