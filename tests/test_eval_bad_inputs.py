"""Evaluation survives unreadable images (skipped, counted, listed), keeps same-named folders apart,
and reads 16-bit images at their real brightness."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import evaluator_fakes as fakes
from evaluator_fakes import DESCRIPTORS, NAMES, write_folder
from grain_jax import inference
from grain_jax.cli import eval as eval_cli
from grain_jax.cli import visualize as visualize_cli
from grain_jax.data import images
from grain_jax.evaluators import zeroshot


@pytest.fixture
def perfect_load(monkeypatch):
    model = fakes.make_inference_model(NAMES)
    monkeypatch.setattr(inference, "load", lambda *a, **k: model)
    return model


def _add_bad_images(class_dir) -> dict[str, str]:
    """A truncated JPEG, a zero-byte file and a text file named .jpg; returns {path: reason prefix}."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    bad = {os.path.join(class_dir, "truncated.jpg"): buffer.getvalue()[: len(buffer.getvalue()) // 2],
           os.path.join(class_dir, "empty.jpg"): b"",
           os.path.join(class_dir, "notes.jpg"): b"this is not an image\n"}
    for path, data in bad.items():
        with open(path, "wb") as f:
            f.write(data)
    return {path: "OSError" if "truncated" in path else "UnidentifiedImageError" for path in bad}


def test_eval_binary_skips_lists_and_counts_unreadable_images(tmp_path, perfect_load, capsys):
    root = write_folder(tmp_path / "bench", descriptor_file=DESCRIPTORS)
    bad = _add_bad_images(os.path.join(root, NAMES[3]))
    out = tmp_path / "results.json"
    eval_cli.main(["grain-jax-eval", "--checkpoint=random:x", f"--evals=folder:{root}", f"--output={out}",
                   "--batch_size=8", "--num_threads=2"])
    result = json.loads(out.read_text())["runs"][0]["results"]["folder_bench"]
    assert result["count"] == 20 and result["top1"] == 1.0  # the denominator is the 20 readable images
    assert result["skipped"] == 3
    assert [s["path"] for s in result["skipped_examples"]] == sorted(bad)
    for skipped in result["skipped_examples"]:
        assert skipped["reason"].startswith(bad[skipped["path"]]), skipped
    printed = capsys.readouterr().out
    assert f"folder_bench: evaluated 20 examples, skipped 3 unreadable image(s): {sorted(bad)[0]} (" in printed


def test_in_training_evaluator_skips_unreadable_images(tmp_path, perfect_load, capsys):
    root = write_folder(tmp_path / "bench", per_class=1, descriptor_file=DESCRIPTORS)
    _add_bad_images(os.path.join(root, NAMES[0]))
    metrics = dict(zeroshot.Evaluator([f"folder:{root}"], num_threads=2).run(perfect_load))
    assert metrics["0shot/folder_bench/top1"] == 1.0
    assert "folder_bench: evaluated 10 examples, skipped 3 unreadable image(s)" in capsys.readouterr().out


def test_same_named_folders_stay_separate(tmp_path, perfect_load, capsys):
    first = write_folder(tmp_path / "a" / "bench", per_class=1, descriptor_file=DESCRIPTORS)
    second = write_folder(tmp_path / "b" / "bench", per_class=2, descriptor_file=DESCRIPTORS)
    out = tmp_path / "results.json"
    eval_cli.main(["grain-jax-eval", "--checkpoint=random:x", f"--evals=folder:{first},folder:{second}",
                   f"--output={out}", "--batch_size=8", "--num_threads=2"])
    results = json.loads(out.read_text())["runs"][0]["results"]
    assert (results["folder_bench"]["count"], results["folder_bench_2"]["count"]) == (10, 20)
    assert f"folder:{second} is reported as folder_bench_2 (folder_bench is folder:{first})" in capsys.readouterr().out


def test_visualize_skips_unreadable_images(tmp_path, perfect_load, capsys):
    for i in range(2):
        Image.fromarray(fakes.label_image(i, 20)).save(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"")
    out = tmp_path / "grid.png"
    visualize_cli.main(["grain-jax-visualize", "--checkpoint=random:x", f"--images={tmp_path}/*.png",
                    "--descriptions=picture 0;picture 1", f"--output={out}", "--columns=2"])
    assert f"skipped unreadable image {tmp_path / '2.png'} (UnidentifiedImageError: " in capsys.readouterr().out
    width, height = Image.open(out).size  # two tiles in one row (each 256 px plus its title band); no third
    assert width == 2 * 256 and 256 < height < 2 * 256


@pytest.mark.parametrize("mode,value,expected", [("I;16", 32896, 128), ("I", 65535, 255), ("I", 200, 200),
                                                 ("F", 0.5, 128)])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode, value, expected):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.full((4, 5), value, dtype))
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(images.to_rgb(image)), np.full((4, 5, 3), expected, np.uint8))
    if mode == "I;16":  # a real 16-bit PNG file read back by the evaluators' reader
        image.save(tmp_path / "gray16.png")
        np.testing.assert_array_equal(images.read_rgb(str(tmp_path / "gray16.png")), np.full((4, 5, 3), 128))


def test_retrieval_skips_unreadable_images_with_their_captions(tmp_path, capsys):
    from grain_jax.evaluators import retrieval
    model = fakes.make_inference_model(NAMES[:4])
    (tmp_path / "imgs").mkdir()
    entries = []
    for i in range(4):
        Image.fromarray(fakes.label_image(i, 12)).save(tmp_path / "imgs" / f"{i}.png")
        entries.append({"image": f"{i}.png", "captions": [f"picture {i}"]})
    bad = _add_bad_images(str(tmp_path / "imgs"))
    entries += [{"image": os.path.basename(path), "captions": ["picture 0"]} for path in bad]
    (tmp_path / "captions.json").write_text(json.dumps(entries))
    data = retrieval.retrieval_dataset(f"captions:{tmp_path / 'captions.json'}", image_dir=str(tmp_path / "imgs"))
    results = retrieval.evaluate(model, data, num_threads=2)
    assert (results["num_images"], results["num_captions"], results["skipped"]) == (4, 4, 3)
    assert results["img2txt_R@1"] == 1.0 and results["txt2img_R@1"] == 1.0
    assert [s["path"] for s in results["skipped_examples"]] == sorted(bad)
    assert "evaluated 4 examples, skipped 3 unreadable image(s)" in capsys.readouterr().out
