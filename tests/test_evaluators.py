"""Zero-shot evaluator, datasets, descriptors and templates, with built-to-be-perfect/wrong fake models."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

import evaluator_fakes as fakes
from evaluator_fakes import DESCRIPTORS, NAMES, write_folder
from grain_jax.evaluators import common, datasets, zeroshot
from grain_jax.inference import batching, classifier, descriptors, prompts


@pytest.fixture(scope="module")
def perfect():
    return fakes.make_inference_model(NAMES)


@pytest.fixture(scope="module")
def wrong():
    return fakes.make_inference_model(NAMES, wrong=True)


def test_perfect_model_scores_exactly_one_and_counts_every_image_once(tmp_path, perfect):
    # 10 classes x 2 = 20 images with batch 8: the last batch is padded.
    data = datasets.folder_dataset(write_folder(tmp_path / "ds", descriptor_file=DESCRIPTORS))
    results = zeroshot.evaluate(perfect, data, alphas=(1.0, 0.5), num_threads=2)
    assert results["count"] == len(data) == 20
    for key in ("top1", "top5", "mean_per_class_recall", "alpha0.5/top1", "alpha0.5/top5"):
        assert results[key] == 1.0, key


def test_region_mix_is_reported_only_for_grain_with_descriptors(tmp_path):
    clip = fakes.make_inference_model(NAMES, mode="clip")
    data = datasets.folder_dataset(write_folder(tmp_path / "ds", per_class=1, descriptor_file=DESCRIPTORS))
    assert zeroshot.usable_alphas(clip, data, None) == (1.0,)
    results = zeroshot.evaluate(clip, data, templates="short", num_threads=2)
    assert results["top1"] == 1.0 and not any(k.startswith("alpha") for k in results)
    plain = datasets.folder_dataset(write_folder(tmp_path / "plain", per_class=1))
    grain = fakes.make_inference_model(NAMES)
    assert zeroshot.usable_alphas(grain, data, None) == (1.0, 0.5, 0.0)  # 0: the regions alone
    assert zeroshot.usable_alphas(grain, plain, (1.0, 0.3)) == (1.0,)


def test_wrong_model_scores_chance(tmp_path, wrong):
    data = datasets.folder_dataset(write_folder(tmp_path / "ds", per_class=3))
    results = zeroshot.evaluate(wrong, data, templates="short", num_threads=2)
    assert results["count"] == 30
    assert results["top1"] == pytest.approx(0.1, abs=1e-12)
    assert results["top5"] == pytest.approx(0.5, abs=1e-12)
    assert results["mean_per_class_recall"] == pytest.approx(0.1, abs=1e-12)


def test_max_examples_takes_a_subset(tmp_path, perfect):
    data = datasets.folder_dataset(write_folder(tmp_path / "ds"))
    results = zeroshot.evaluate(perfect, data, max_examples=7, templates="short", num_threads=2)
    assert results["count"] == 7 and results["top1"] == 1.0


def _label_source(num_examples):
    """What tfds.data_source returns under mock_data: label images with cycling labels."""
    return [{"image": fakes.label_image(i % 10, 16), "label": i % 10} for i in range(num_examples)]


def test_tfds_catalog_path_with_mock_data(tmp_path, perfect):
    desc_dir = tmp_path / "desc"
    desc_dir.mkdir()
    (desc_dir / "descriptors_cifar10.json").write_text(json.dumps(DESCRIPTORS))
    with tfds.testing.mock_data(num_examples=13, as_data_source_fn=lambda builder, split, **kw: _label_source(13)):
        data = datasets.classification_dataset("cifar10", data_dir=str(tmp_path / "tfds"), descriptors=str(desc_dir))
        # Under mock_data TFDS has no metadata, so cifar10's label names are "0".."9".
        assert data.class_names == NAMES and len(data) == 13
        results = zeroshot.evaluate(perfect, data, num_threads=2)
    assert results["count"] == 13 and results["top1"] == 1.0


def test_tfds_catalog_dataset_from_a_prepared_directory(tmp_path, perfect):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=["background_google"] + NAMES)})
    examples = [{"image": fakes.png(fakes.label_image(i % 10, 14)), "label": 1 + i % 10} for i in range(12)]
    examples.append({"image": fakes.png(fakes.label_image(0, 14)), "label": 0})  # not a caltech101 class
    fakes.write_prepared_tfds(tmp_path / "caltech101" / "3.0.2", features, examples, "test")
    data = datasets.classification_dataset("caltech101", data_dir=str(tmp_path))
    assert data.class_names == NAMES and len(data) == 13
    results = zeroshot.evaluate(perfect, data, templates="short", num_threads=2)
    assert results["count"] == 12 and results["top1"] == 1.0  # the background example is not counted


def test_tfds_dataset_not_prepared_says_how_to_build(tmp_path):
    with pytest.raises(datasets.NotPrepared, match=r"cifar10: not prepared: run tfds build cifar10 "
                                                   r"--file_format=array_record --data_dir"):
        datasets.classification_dataset("cifar10", data_dir=str(tmp_path))


def test_folder_with_mismatched_descriptors_fails_naming_the_classes(tmp_path):
    bad = {n: ["whiskers"] for n in NAMES[:-1]}
    bad["zebra"] = ["stripes"]
    root = write_folder(tmp_path / "ds", per_class=1, descriptor_file=bad)
    with pytest.raises(ValueError, match=r"missing from the descriptors: \['9'\].*not in the dataset: \['zebra'\]"):
        datasets.folder_dataset(root)


def test_descriptors_are_reordered_to_the_dataset_label_order(tmp_path):
    shuffled = {n: DESCRIPTORS[n] for n in reversed(NAMES)}
    data = datasets.folder_dataset(write_folder(tmp_path / "ds", per_class=1, descriptor_file=shuffled))
    assert data.class_names == NAMES
    assert [data.descriptors[n] for n in NAMES] == [DESCRIPTORS[n] for n in NAMES]


def test_synthetic_layout_descriptors_next_to_the_split_folder(tmp_path):
    zeroshot_dir = tmp_path / "syn" / "zeroshot"
    write_folder(zeroshot_dir / "novel", per_class=1, names=["red ball", "blue cube"])
    (zeroshot_dir / "descriptors_novel.json").write_text(json.dumps({"red ball": ["round"], "blue cube": ["boxy"]}))
    data = datasets.classification_dataset("synthetic:novel", synthetic_dir=str(tmp_path / "syn"))
    assert data.name == "synthetic_novel" and data.class_names == ["blue cube", "red ball"]
    assert data.descriptors == {"blue cube": ["boxy"], "red ball": ["round"]}


def test_canonical_names_match_tfds_label_styles():
    assert descriptors.canonical_name("001.Black_footed_Albatross") == "black footed albatross"
    assert descriptors.canonical_name("/a/airplane_cabin") == "airplane cabin"
    assert descriptors.canonical_name("apple_pie") == descriptors.canonical_name("Apple pie")
    names, aligned = descriptors.align({"b": ["x"], "a": ["y"]}, ["n1", "n2"], source="s", names_are_ids=True)
    assert names == ["b", "a"] and aligned["a"] == ["y"]
    with pytest.raises(ValueError, match="2 classes but the dataset has 3"):
        descriptors.align({"b": ["x"], "a": ["y"]}, ["1", "2", "3"], source="s", names_are_ids=True)


def test_descriptor_sentence_follows_the_reference_rule():
    assert descriptors.descriptor_sentence("a long tail") == " which is a long tail"
    assert descriptors.descriptor_sentence("angular wings") == " which is angular wings"  # the startswith("a") quirk
    assert descriptors.descriptor_sentence("has stripes") == " which has stripes"
    assert descriptors.descriptor_sentence("often red") == " which often red"
    assert descriptors.descriptor_sentence("used for riding") == " which is used for riding"
    assert descriptors.descriptor_sentence("four legs") == " which has four legs"


def test_class_prompts_are_descriptor_major_templates_times_descriptors():
    out = descriptors.class_prompts("cat", ["whiskers", "a tail"], prompts.REFERENCE_46)
    assert len(out) == 46 * 2
    assert out[0] == "a bad photo of a cat, which has whiskers"
    assert out[46] == "a bad photo of a cat, which is a tail"
    assert descriptors.class_prompts("cat", None, prompts.SHORT) == [t.format("cat") for t in prompts.SHORT]
    assert descriptors.class_prompts("cat", ["fur"], ["a photo of a {}."]) == ["a photo of a cat, which has fur"]


def test_remove_name_replaces_whole_mentions_only():
    assert prompts.remove_name("a bo's tail, not a bold body; Bo, BO.", "bo") == \
        "an object's tail, not a bold body; object, object."
    # the article before a mention agrees with the neutral word, keeping its capital
    assert prompts.remove_name("A bebo, an bebo, a  bebo, abebo", "bebo") == "An object, an object, an  object, abebo"
    assert prompts.remove_name("an apple", "apple", neutral="thing") == "a thing"
    assert prompts.remove_name("abo bob bo-like", "bo") == "abo bob object-like"  # "-" ends a word
    assert prompts.remove_name("a red  panda's nose, a red pandas", "red panda") == "an object's nose, a red pandas"
    assert prompts.remove_name("a red body, a panda", "red panda") == "a red body, a panda"  # words apart
    assert prompts.remove_name("c++ and c", "c++") == "object and c"  # regex characters are literal
    assert prompts.remove_name("no mention", "bebo", neutral="thing") == "no mention"


def test_name_free_classifier_keeps_templates_and_descriptors_but_not_the_name():
    encoded = []

    def encode(texts):
        encoded.extend(texts)
        return np.ones((len(texts), 4), np.float32) / 2

    descs = {"bebo": ["a red body", "has a bebo-like tail"], "red panda": ["a bold red panda face"]}
    clf = classifier.build(encode, ["bebo", "red panda"], descs, ["a photo of a {},", "itap of {},"], name_free=True)
    assert clf.class_names == ["bebo", "red panda"]  # the labels keep their names, the prompts do not
    assert encoded[:6] == ["a photo of an object, which is a red body", "itap of object, which is a red body",
                           "a photo of an object, which has an object-like tail",
                           "itap of object, which has an object-like tail",
                           "a photo of an object, which is a bold object face", "itap of object, which is a bold object face"]
    assert encoded[6:] == ["a red body", "has an object-like tail", "a bold object face"]  # the region descriptors
    encoded.clear()
    classifier.build(encode, ["bebo"], None, ["a photo of a {},"], name_free=True)
    assert encoded == ["a photo of an object,"]


def test_concatenated_classifiers_pad_descriptors():
    a = classifier.Classifier(["x"], np.ones((1, 2)), np.ones((1, 1, 2)), np.ones((1, 1), bool))
    b = classifier.Classifier(["y", "z"], np.zeros((2, 2)), np.full((2, 3, 2), 2.0), np.ones((2, 3), bool))
    both = classifier.concatenate(a, b)
    assert both.class_names == ["x", "y", "z"] and both.embeddings.shape == (3, 2)
    assert both.descriptor_embeddings.shape == (3, 3, 2)
    assert both.descriptor_mask.tolist() == [[True, False, False]] + [[True] * 3] * 2
    with pytest.raises(ValueError, match="with descriptors and one without"):
        classifier.concatenate(a, classifier.Classifier(["y"], np.zeros((1, 2))))


def test_name_free_metrics_score_the_prompts_without_names(tmp_path, perfect):
    """The fake reads a text's class from its name only: without names every class embedding is class 0's,
    so the name-free columns score exactly chance where the named ones are perfect."""
    root = write_folder(tmp_path / "ds", per_class=1, descriptor_file=DESCRIPTORS)
    folder = datasets.folder_dataset(root)
    assert not any(k.startswith("name_free/") for k in zeroshot.evaluate(perfect, folder, num_threads=2))
    synthetic = datasets.folder_dataset(root, name="synthetic_novel")  # on by default for the synthetic benchmark
    for data, name_free in ((synthetic, None), (folder, True)):
        results = zeroshot.evaluate(perfect, data, templates="short", name_free=name_free, num_threads=2)
        assert results["top1"] == results["alpha0.5/top1"] == 1.0
        assert results["name_free/top1"] == results["name_free/mean_per_class_recall"] == pytest.approx(0.1)
        assert results["name_free/top5"] == pytest.approx(0.5)
        assert results["name_free/alpha0/top1"] == results["alpha0/top1"]  # the regions never read a name
        assert {k for k in results if k.startswith("name_free/")} == {
            f"name_free/{a}{m}" for a in ("", "alpha0.5/", "alpha0/") for m in zeroshot.METRICS}
    assert not any(k.startswith("name_free/") for k in zeroshot.evaluate(perfect, synthetic, name_free=False,
                                                                        num_threads=2))
    clip = fakes.make_inference_model(NAMES, mode="clip")
    results = zeroshot.evaluate(clip, synthetic, templates="short", num_threads=2)
    assert {k for k in results if k.startswith("name_free/")} == {f"name_free/{m}" for m in zeroshot.METRICS}
    evaluator = zeroshot.Evaluator([f"folder:{root}"], templates="short", name_free=True, num_threads=2)
    metrics = dict(evaluator.run(perfect))
    assert metrics["0shot/folder_ds/name_free/top1"] == pytest.approx(0.1)
    assert "0shot/folder_ds/name_free/alpha0.5/top1" in metrics


def test_template_sets():
    assert len(prompts.get_templates("ref46")) == 46
    assert sum("type of bird" in t or "a  type" in t for t in prompts.REFERENCE_46) == 23
    assert len(set(prompts.get_templates("clip80"))) == 80
    assert prompts.get_templates("per_dataset", "food101")[0] == "a photo of {}, a type of food,"
    assert prompts.get_templates("per_dataset", "my_folder") == prompts.SHORT
    with pytest.raises(ValueError, match="exactly one"):
        prompts.get_templates(["no placeholder"])
    with pytest.raises(ValueError, match="unknown template set"):
        prompts.get_templates("ref47")


def test_descriptor_file_validation(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"cat": "whiskers"}))
    with pytest.raises(ValueError, match="class 'cat' must map to a list"):
        descriptors.load(str(path))


def test_averages_follow_the_reference_eleven():
    results = {"cifar10": {"top1": 0.5}, "dtd": {"top1": 0.3}, "imagenet2012": {"top1": 0.9}}
    out = zeroshot.averages(results)
    assert out["average_11/top1"] == pytest.approx(0.4)
    assert out["average/top1"] == pytest.approx(1.7 / 3)
    # A metric only some datasets report (region mixes, name_free/) has no average over all of them.
    results["cifar10"]["name_free/top1"] = 0.2
    assert set(zeroshot.averages(results)) == {"average/top1", "average_11/top1"}


def test_expand_groups():
    assert datasets.expand("synthetic,cifar10") == ["synthetic:seen", "synthetic:novel", "cifar10"]
    assert datasets.expand("all") == list(datasets.ALL) and len(datasets.ELEVEN) == 11


def test_from_config_and_run_yield_prefixed_metric_names(tmp_path, perfect):
    root = write_folder(tmp_path / "ds", per_class=1)
    evals = common.from_config({"zs": {"type": "zeroshot", "every_steps": 10, "datasets": [f"folder:{root}"],
                                       "templates": "short", "num_threads": 2}})
    (name, evaluator, every, prefix), = evals
    assert (name, every, prefix) == ("zs", 10, "eval/")
    metrics = dict(evaluator.run(perfect))
    assert metrics == {"0shot/folder_ds/top1": 1.0, "0shot/folder_ds/top5": 1.0,
                       "0shot/folder_ds/mean_per_class_recall": 1.0}
    with pytest.raises(ValueError, match="type must be one of"):
        common.from_config({"x": {"type": "detection"}})
    with pytest.raises(ValueError, match=r"config.evals\['zs'\] \(zeroshot\)"):
        common.from_config({"zs": {"type": "zeroshot", "datasets": "synthetic:novel", "bogus": 1}})


def test_in_training_evaluator_skips_datasets_not_prepared(tmp_path, perfect):
    """A TFDS dataset missing under data_dir is skipped (warning); the prepared ones still run."""
    root = write_folder(tmp_path / "ds", per_class=1)
    evaluator = zeroshot.Evaluator(["cifar10", f"folder:{root}"], data_dir=str(tmp_path / "tfds"),
                                   templates="short", num_threads=2)
    for _ in range(2):  # the second run does not retry the missing dataset
        metrics = dict(evaluator.run(perfect))
        assert metrics["0shot/folder_ds/top1"] == 1.0
        assert not any("cifar10" in name for name in metrics)
    assert evaluator._not_prepared == {"cifar10"}


def test_fixed_size_batches_pad_without_duplicates():
    x = np.arange(11)[:, None]
    chunks = list(batching.fixed_size_batches(x, 4))
    assert [n for _, n in chunks] == [4, 4, 3]
    assert all(c.shape == (4, 1) for c, _ in chunks)
    assert np.concatenate([c[:n] for c, n in chunks]).ravel().tolist() == list(range(11))
