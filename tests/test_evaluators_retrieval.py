"""Retrieval evaluator: exact Recall@K with a perfect fake model, a brute-force oracle, caption files."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import evaluator_fakes as fakes
from grain_jax.evaluators import common, retrieval

IDS = [str(i) for i in range(8)]


@pytest.fixture(scope="module")
def perfect():
    return fakes.make_inference_model(IDS)


def write_captioned_images(root, captions_per_image=3):
    """8 label images; the captions of image i all mention i (and contain commas)."""
    root.mkdir()
    entries = []
    for i in range(len(IDS)):
        Image.fromarray(fakes.label_image(i, 10 + i)).save(root / f"img{i}.png")
        entries.append({"image": f"img{i}.png",
                        "captions": [f"picture {i}, taken outside, variant {'abc'[j]}"
                                     for j in range(captions_per_image)]})
    return entries


def test_perfect_model_has_recall_one_both_ways(tmp_path, perfect):
    entries = write_captioned_images(tmp_path / "imgs")
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(entries))
    data = retrieval.retrieval_dataset(f"captions:{path}", image_dir=str(tmp_path / "imgs"))
    results = retrieval.evaluate(perfect, data, num_threads=2)
    assert results["num_images"] == 8 and results["num_captions"] == 24
    for k in (1, 5, 10):
        assert results[f"img2txt_R@{k}"] == 1.0 and results[f"txt2img_R@{k}"] == 1.0


def test_evaluator_from_config_yields_namespaced_metrics(tmp_path, perfect):
    entries = write_captioned_images(tmp_path / "imgs", captions_per_image=1)
    path = tmp_path / "flickr.json"
    path.write_text(json.dumps(entries))
    (_, evaluator, _, _), = common.from_config(
        {"ret": {"type": "retrieval", "dataset": f"captions:{path}", "image_dir": str(tmp_path / "imgs"),
                 "num_threads": 2}})
    metrics = dict(evaluator.run(perfect))
    assert metrics["retrieval/flickr/img2txt_R@1"] == 1.0 and len(metrics) == 6


def test_coco_captions_from_a_prepared_tfds_directory(tmp_path, perfect):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()})})
    examples = [{"image": fakes.png(fakes.label_image(i, 12)), "captions": {"text": [f"picture {i}", f"a {i}, b"]}}
                for i in range(len(IDS))]
    fakes.write_prepared_tfds(tmp_path / "coco_captions" / "2014" / "1.1.0", features, examples, "test")
    # coco_captions' builder code imports TensorFlow: the prepared directory is read from its metadata.
    data = retrieval.retrieval_dataset("coco_captions", data_dir=str(tmp_path))
    results = retrieval.evaluate(perfect, data, num_threads=2)
    assert results["num_captions"] == 16 and results["img2txt_R@1"] == results["txt2img_R@1"] == 1.0


def test_recall_matches_brute_force_oracle():
    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(7), rng.integers(1, 4, size=7))
    sims = rng.normal(size=(7, len(caption_image)))
    got = retrieval.recall_at_k(sims, caption_image, chunk=3)
    for k in (1, 5, 10):
        i2t = np.mean([set(caption_image[np.argsort(-sims[i])[:k]]) >= {i} for i in range(7)])
        t2i = np.mean([caption_image[t] in np.argsort(-sims[:, t])[:k] for t in range(len(caption_image))])
        assert got[f"img2txt_R@{k}"] == pytest.approx(i2t) and got[f"txt2img_R@{k}"] == pytest.approx(t2i)


def test_csv_caption_lists_are_parsed_as_json_not_split_on_commas(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    rows = ["filename,raw,split",
            'a.jpg,"[""a dog, running"", ""a brown dog""]",test',
            'b.jpg,"[""a cat""]",train',
            'b.jpg,a cat, sitting,test']
    (tmp_path / "f.csv").write_text("\n".join(rows[:3]) + "\n")
    items = retrieval.read_caption_file(str(tmp_path / "f.csv"))
    assert items == [(str(tmp_path / "a.jpg"), ["a dog, running", "a brown dog"])]
    (tmp_path / "bad.csv").write_text('filename,raw\na.jpg,"[""unterminated"\n')
    with pytest.raises(ValueError, match="bad.csv row 2: caption list is not valid JSON"):
        retrieval.read_caption_file(str(tmp_path / "bad.csv"))


def test_karpathy_json_keeps_the_requested_split(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    karpathy = {"images": [{"filename": "x.jpg", "split": "test", "sentences": [{"raw": "one, two"}]},
                           {"filename": "missing.jpg", "split": "train", "sentences": [{"raw": "no"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    assert retrieval.read_caption_file(str(tmp_path / "k.json")) == [(str(tmp_path / "x.jpg"), ["one, two"])]
    with pytest.raises(FileNotFoundError, match="1 images not found"):
        retrieval.read_caption_file(str(tmp_path / "k.json"), split="train")
