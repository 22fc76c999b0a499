"""grain-jax-eval and grain-jax-visualize end to end."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import evaluator_fakes as fakes
from grain_jax import checkpoints, inference, visualize
from grain_jax.cli import eval as eval_cli
from grain_jax.cli import visualize as visualize_cli
from grain_jax.evaluators import suite
from evaluator_fakes import DESCRIPTORS, NAMES, write_folder


@pytest.fixture
def perfect_load(monkeypatch):
    """inference.load -> the perfect fake model, whatever the checkpoint name."""
    model = fakes.make_inference_model(NAMES)
    monkeypatch.setattr(inference, "load", lambda *a, **k: model)
    return model


def test_binary_writes_json_table_and_chart_and_skips_unprepared(tmp_path, perfect_load, capsys):
    root = write_folder(tmp_path / "bench", descriptor_file=DESCRIPTORS)
    out = tmp_path / "out" / "results.json"
    for name in ("ckpt_a", "ckpt_b"):  # checkpoint directories (the fake model is loaded whatever they hold)
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoints.MODEL_CONFIG).write_text("{}")
    eval_cli.main(["grain-jax-eval", "--checkpoint", f"{tmp_path}/ckpt_a,{tmp_path}/ckpt_b",
                   f"--evals=folder:{root},cifar10", f"--data_dir={tmp_path / 'tfds'}", f"--output={out}",
                   "--batch_size=8", "--num_threads=2"])
    printed = capsys.readouterr().out
    assert "cifar10: not prepared: run tfds build cifar10 --file_format=array_record" in printed
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["label-fake ckpt_a", "label-fake ckpt_b"]  # model and checkpoint
    result = runs[0]["results"]["folder_bench"]
    assert result["top1"] == 1.0 and result["alpha0.5/top1"] == 1.0 and "alpha0/top1" in result  # α=0: regions only
    assert result["count"] == 20
    assert result["images_per_second"] > 0 and runs[0]["not_prepared"] == ["cifar10"]
    assert "| folder_bench top1 | 100.00 | 100.00 |" in printed
    assert "| folder_bench top1, α=0.5 | 100.00 | 100.00 |" in printed
    assert "| folder_bench top1, α=0 | " in printed
    assert "name_free/top1" not in result  # real class names: name-free metrics only with --name_free
    # The chart's bars: every checkpoint at α = 1, 0.5 and 0 (regions alone).
    assert suite._top1_series(runs) == [(i, key) for i in (0, 1) for key in ("top1", "alpha0.5/top1", "alpha0/top1")]
    png = np.asarray(Image.open(out.with_suffix(".png")))
    assert png.ndim == 3 and png.shape[0] > 100

    # --compare re-plots earlier results without evaluating.
    both = tmp_path / "both.json"
    eval_cli.main(["grain-jax-eval", f"--compare={out},{out}", f"--output={both}"])
    assert len(json.loads(both.read_text())["runs"]) == 4 and both.with_suffix(".png").exists()


def test_binary_name_free_flag_adds_the_name_free_rows(tmp_path, perfect_load, capsys):
    root = write_folder(tmp_path / "bench", per_class=1, descriptor_file=DESCRIPTORS)
    out = tmp_path / "results.json"
    eval_cli.main(["grain-jax-eval", "--checkpoint=random:x", f"--evals=folder:{root}", f"--output={out}",
                   "--name_free", "--synthetic_alphas=1,0.5", "--batch_size=8", "--num_threads=2"])
    printed = capsys.readouterr().out
    run, = json.loads(out.read_text())["runs"]
    assert run["results"]["folder_bench"]["name_free/top1"] == pytest.approx(0.1)  # the fake reads names only
    assert run["config"]["name_free"] is True
    assert "| folder_bench top1, names → object | 10.00 |" in printed
    assert "| folder_bench top1, names → object, α=0.5 | " in printed
    assert suite.metric_label("name_free/alpha0.5/top5") == "top5, names → object, α=0.5"
    assert suite.metric_label("average/name_free/top1") == "average/name_free/top1"


def test_binary_checks_every_dataset_before_loading_a_model(tmp_path, monkeypatch):
    good = write_folder(tmp_path / "good", per_class=1)
    bad = write_folder(tmp_path / "bad", per_class=1, descriptor_file={"zebra": ["stripes"]})
    monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("model loaded before the data was checked"))
    with pytest.raises(ValueError, match="not in the dataset: \\['zebra'\\]"):
        eval_cli.main(["grain-jax-eval", "--checkpoint=random:x", f"--evals=folder:{good},folder:{bad}",
                       f"--output={tmp_path / 'r.json'}"])


def test_visualize_draws_a_grid(tmp_path, perfect_load):
    for i in range(3):
        Image.fromarray(fakes.label_image(i, 20 + i)).save(tmp_path / f"{i}.png")
    out = tmp_path / "grid.png"
    visualize_cli.main(["grain-jax-visualize", "--checkpoint=random:x", f"--images={tmp_path}/*.png",
                    "--descriptions=picture 0, round;picture 1;picture 2", f"--output={out}", "--columns=2"])
    grid = Image.open(out)
    assert grid.width == 2 * 256 and 2 * 256 < grid.height < 2 * 256 + 60  # two rows of titled tiles
    matches = visualize.match_descriptions(perfect_load.ground(np.stack([fakes.label_image(i) for i in range(3)])),
                                           perfect_load.encode_texts(["picture 0", "picture 1", "picture 2"]))
    assert [m[0][1] for m in matches] == [0, 1, 2]  # each image's boxes match its own description
    assert all(len(m) == fakes.LabelModel.num_queries for m in matches)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A params-only checkpoint of a randomly initialised grain-tiny, and the model it came from."""
    model = inference.load("random:grain-tiny", batch_size=4)
    directory = str(tmp_path_factory.mktemp("tiny_ckpt"))
    checkpoints.save_params(directory, model.params, model.spec)
    return directory, model


def test_load_of_a_saved_params_checkpoint_gives_the_same_embeddings(tiny_checkpoint):
    directory, original = tiny_checkpoint
    restored = inference.load(directory, batch_size=4)
    assert restored.mode == "grain" and restored.spec.model_name == "grain-tiny"
    assert (restored.spec.image_size, list(restored.spec.mean)) == (original.spec.image_size, list(original.spec.mean))
    images = np.random.default_rng(0).integers(0, 256, (5, 30, 41, 3), dtype=np.uint8)
    np.testing.assert_array_equal(restored.encode_images(images), original.encode_images(images))
    np.testing.assert_array_equal(restored.encode_texts(["a dog", "a cat"]), original.encode_texts(["a dog", "a cat"]))
    grounding = restored.ground(images)
    assert grounding["boxes"].shape == (5, restored.model.num_queries, 4)
    assert np.all((grounding["boxes"] >= 0) & (grounding["boxes"] <= 1))


def test_binary_end_to_end_on_a_tiny_random_checkpoint(tmp_path, tiny_checkpoint, capsys):
    root = write_folder(tmp_path / "bench", per_class=2, names=["red ball", "blue cube", "green cone"],
                        descriptor_file={"red ball": ["round"], "blue cube": ["has corners"], "green cone": ["a tip"]})
    out = tmp_path / "results.json"
    args = [f"--checkpoint={tiny_checkpoint[0]}", f"--evals=folder:{root}", f"--output={out}", "--batch_size=8",
            "--templates=short", "--num_threads=2"]
    eval_cli.run([*args, "--verbosity=1"])
    assert "orbax" in capsys.readouterr().out  # the checkpoint library's own log lines, at --verbosity=1 only
    eval_cli.run(args)
    console = capsys.readouterr().out.splitlines()
    label = f"grain-tiny {os.path.basename(tiny_checkpoint[0])}@0"
    assert console[0] == f"evaluating {tiny_checkpoint[0]} on folder:{root}" and console[-1].startswith("results: ")
    assert console[1] == f"| dataset / metric (%) | {label} |"
    assert all(line.startswith("| folder_bench ") for line in console[3:-1]), console  # nothing but the table
    run, = json.loads(out.read_text())["runs"]
    result = run["results"]["folder_bench"]
    assert result["count"] == 6 and result["num_classes"] == 3
    assert 0.0 <= result["top1"] <= 1.0 and result["top5"] == 1.0  # 3 classes: top-5 always hits
    assert "alpha0.5/top1" in result and run["model"]["model_name"] == "grain-tiny"
    assert run["step"] == 0 and run["label"] == label
    assert out.with_suffix(".png").stat().st_size > 0


def test_folder_without_descriptors_warns_on_the_console(tmp_path, perfect_load, capsys):
    root = write_folder(tmp_path / "bench")
    eval_cli.run(["--checkpoint=random:x", f"--evals=folder:{root}", f"--output={tmp_path / 'r.json'}",
                  "--batch_size=8", "--num_threads=2"])
    assert (f"WARNING: folder_bench: no descriptors file ({root}/descriptors.json, or --descriptors): classes are "
            "scored by their names alone, so there are no region (alpha < 1) results") in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())["runs"][0]["results"]["folder_bench"]
    assert "alpha0.5/top1" not in result


def test_nothing_prepared_exits_nonzero_with_a_hint_that_needs_no_tensorflow(tmp_path, perfect_load, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.run(["--checkpoint=random:x", "--evals=cifar10,food101", f"--data_dir={tmp_path}",
                      f"--output={tmp_path / 'r.json'}"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"grain-jax-eval: error: nothing to evaluate: none of cifar10, food101 is prepared under {tmp_path}. "
        "Building TFDS datasets needs TensorFlow (pip install tensorflow, then tfds build NAME "
        "--file_format=array_record --data_dir DIR); without it, evaluate an image folder (--evals folder:PATH, "
        "PATH/<class>/*.jpg) or the embedded benchmark (--evals synthetic --synthetic_dir DIR)"]
    assert not (tmp_path / "r.json").exists()


def test_labels_never_overlap_and_stay_inside():
    sizes = [(120, 11)] * 8 + [(250, 11)]
    anchors = [(10, 10)] * 4 + [(200, 250)] * 4 + [(0, 0)]  # several boxes sharing a corner, some at the bottom
    rects = visualize.place_labels(sizes, anchors, 256, 256)
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 256 and 0 <= a[1] and a[3] <= 256
        for b in rects[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert rects[0] == (10, 10, 130, 21)  # the best match sits at its box's corner
