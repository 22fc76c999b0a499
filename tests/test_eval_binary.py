"""grain-jax-eval and grain-jax-visualize end to end."""
import json

import numpy as np
import pytest
from PIL import Image

import evaluator_fakes as fakes
from grain_jax import evaluate, inference, visualize
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
    evaluate.main(["grain-jax-eval", "--checkpoint", "ckpt_a,ckpt_b", f"--evals=folder:{root},cifar10",
                   f"--data_dir={tmp_path / 'tfds'}", f"--output={out}", "--batch_size=8", "--num_threads=2"])
    printed = capsys.readouterr().out
    assert "cifar10: not prepared: run tfds build cifar10 --file_format=array_record" in printed
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["ckpt_a", "ckpt_b"]
    result = runs[0]["results"]["folder_bench"]
    assert result["top1"] == 1.0 and result["alpha0.5/top1"] == 1.0 and result["count"] == 20
    assert result["images_per_second"] > 0 and runs[0]["not_prepared"] == ["cifar10"]
    assert "| folder_bench top1 | 100.00 | 100.00 |" in printed
    png = np.asarray(Image.open(out.with_suffix(".png")))
    assert png.ndim == 3 and png.shape[0] > 100

    # --compare re-plots earlier results without evaluating.
    both = tmp_path / "both.json"
    evaluate.main(["grain-jax-eval", f"--compare={out},{out}", f"--output={both}"])
    assert len(json.loads(both.read_text())["runs"]) == 4 and both.with_suffix(".png").exists()


def test_visualize_draws_a_grid(tmp_path, perfect_load):
    for i in range(3):
        Image.fromarray(fakes.label_image(i, 20 + i)).save(tmp_path / f"{i}.png")
    out = tmp_path / "grid.png"
    visualize.main(["grain-jax-visualize", "--checkpoint=x", f"--images={tmp_path}/*.png",
                    "--descriptions=picture 0, round;picture 1;picture 2", f"--output={out}", "--columns=2"])
    grid = Image.open(out)
    assert grid.size == (2 * 256, 2 * 256)
    matches = visualize.match_descriptions(perfect_load.ground(np.stack([fakes.label_image(i) for i in range(3)])),
                                           perfect_load.encode_texts(["picture 0", "picture 1", "picture 2"]))
    assert [m[0][1] for m in matches] == [0, 1, 2]  # each image's boxes match its own description
    assert all(len(m) == fakes.LabelModel.num_queries for m in matches)
