"""The synthetic grounded benchmark: catalogue, drawing, texts, split disjointness, the cached directory."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from grain_jax.data import synthetic, tokenizer
from grain_jax.evaluators import datasets

SMALL = dict(num_seen_classes=8, num_novel_classes=3)  # a small catalogue for the directory tests


@pytest.fixture(scope="module")
def train_scenes():
    return synthetic.generate_scenes("train", 0, 300, with_labels=True)


def test_catalogue_is_deterministic_and_novel_classes_recombine_seen_parts():
    cat = synthetic.catalogue(seed=0)
    assert cat == synthetic.catalogue.__wrapped__(0, 40, 10)  # recomputed, not just the cached object
    assert cat != synthetic.catalogue(seed=1)
    assert len(cat.seen) == 40 and len(cat.novel) == 10
    seen_names, novel_names = cat.class_names("seen"), cat.class_names("novel")
    assert seen_names == sorted(seen_names) and novel_names == sorted(novel_names)
    assert not set(seen_names) & set(novel_names)
    assert all(word not in name for name in seen_names + novel_names for word in synthetic.ATTRIBUTE_WORDS)

    seen = np.array([c.attributes for c in cat.seen])
    novel = np.array([c.attributes for c in cat.novel])
    off_diagonal = ~np.eye(len(seen), dtype=bool)
    assert synthetic._distances(seen, seen)[off_diagonal].min() >= 2
    assert synthetic._distances(novel, seen).min() >= 2  # no novel combination is a seen class
    assert synthetic._distances(novel, novel)[~np.eye(len(novel), dtype=bool)].min() >= 3
    for factor, (name, num_values) in enumerate(synthetic.FACTORS):  # every part value is seen in training
        assert set(seen[:, factor]) == set(range(num_values)), name
    seen_phrase_words = {w for c in cat.seen for d in c.descriptors for w in d.split()}
    for concept in cat.novel:
        assert 4 <= len(concept.descriptors) <= 5
        assert {w for d in concept.descriptors for w in d.split()} <= seen_phrase_words
    assert len({tuple(c.descriptors) for c in cat.novel}) == len(cat.novel)  # descriptors tell them apart
    assert cat.descriptors("novel") == {c.name: c.descriptors for c in cat.novel}


def test_descriptor_phrases_name_the_parts():
    concept = synthetic.ConceptClass("dafok", shape=2, colour=5, pattern=1, part_kind=0, part_colour=0,
                                     part_size=0, part_side=0, base=2)
    assert concept.descriptors == ["a triangular body", "an orange body", "has a striped body",
                                   "a small red disc on top", "has two wheels"]
    no_base = synthetic.ConceptClass("mibu", 0, 2, 0, 2, 3, 1, 2, 0)
    assert no_base.part_phrases() == [("a round body", "body"), ("a blue body", "body"),
                                      ("has a plain body", "body"),
                                      ("a large yellow block on its right side", "part")]


def test_scenes_are_deterministic_and_independent_of_how_the_range_is_cut(train_scenes):
    again = synthetic.generate_scenes("train", 250, 10)  # crosses the chunk boundary at 256
    for a, b in zip(train_scenes[250:260], again):
        assert a.id == b.id
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.caption, a.mllm_caption, a.regions) == (b.caption, b.mllm_caption, b.regions)
    other_seed = synthetic.generate_scenes("train", 0, 4, seed=1)
    assert not np.array_equal(other_seed[0].image, train_scenes[0].image)
    validation = synthetic.generate_scenes("validation", 0, 4)
    assert not np.array_equal(validation[0].image, train_scenes[0].image)


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return (np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / mask.shape[0]).tolist()


def test_boxes_are_the_tight_boxes_of_the_drawn_pixels(train_scenes):
    resolution = train_scenes[0].image.shape[0]
    for scene in train_scenes[:100]:
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 3 and scene.labels.shape == (len(scene.objects), 64, 64)
        assert not (np.count_nonzero(scene.labels, 0) > 1).any()  # objects never overlap
        for obj, labels in zip(scene.objects, scene.labels):
            parts = {"body": np.isin(labels, [synthetic.BODY, synthetic.BODY_MARK]),
                     "part": labels == synthetic.PART, "base": labels == synthetic.BASE}
            has_base = synthetic.BASES[obj.concept.base] != "none"
            assert set(obj.boxes) == {"object", "body", "part"} | ({"base"} if has_base else set())
            assert parts["base"].any() == has_base
            for name, mask in parts.items():
                if mask.any():
                    assert obj.boxes[name] == pytest.approx(_tight_box(mask), abs=1e-9), name
            assert obj.boxes["object"] == pytest.approx(_tight_box(labels > 0), abs=1e-9)
            assert all(0.0 <= c <= 1.0 for box in obj.boxes.values() for c in box)
            # The image shows the object's colours exactly where its label map says.
            ys, xs = np.nonzero(labels)
            np.testing.assert_array_equal(scene.image[ys, xs], obj.palette[labels[ys, xs]])
        assert resolution == 64
    # Down to the smallest resolution every part of every object is drawn (boxes are never empty).
    for scene in synthetic.generate_scenes("train", 0, 512, resolution=32, seed=5):
        for obj in scene.objects:
            has_base = synthetic.BASES[obj.concept.base] != "none"
            assert set(obj.boxes) == {"object", "body", "part"} | ({"base"} if has_base else set())


def _words(text: str) -> set[str]:
    return set(text.lower().replace(",", " ").replace(".", " ").replace(":", " ").split())


def test_alt_text_names_classes_and_layout_only_and_regions_ground_part_phrases(train_scenes):
    attribute_words = set(synthetic.ATTRIBUTE_WORDS) - {"top", "left", "right"}  # layout uses these
    for scene in train_scenes:
        names = {o.concept.name for o in scene.objects}
        assert not _words(scene.caption) & attribute_words, scene.caption  # no part knowledge in alt-text
        assert names <= _words(scene.caption), scene.caption
        allowed = {}
        for o in scene.objects:
            allowed.setdefault(f"{synthetic._article(o.concept.name)} {o.concept.name}", []).append(o.boxes["object"])
            for phrase, part in o.concept.part_phrases():
                allowed.setdefault(phrase, []).append(o.boxes[part])
        assert 1 <= len(scene.regions) <= 5
        scores = [r["score"] for r in scene.regions]
        assert scores == sorted(scores, reverse=True) and all(0.3 <= s <= 1.0 for s in scores)
        for region in scene.regions:
            assert region["box"] in allowed[region["description"]]
    longest = tokenizer.tokenize([s.mllm_caption for s in train_scenes] + [s.caption for s in train_scenes], 77)
    assert (longest != 0).sum(1).max() <= 32  # fits the demo's caption length without truncation


def _mentioned_values(scene) -> list[tuple[str, bool]]:
    """(factor, whether the caption's value is the object's) for each part value a holistic MLLM caption
    of a one-object scene mentions."""
    concept = scene.objects[0].concept
    words = _words(scene.mllm_caption)
    found = []
    for factor, names in (("colour", synthetic.COLOUR_NAMES), ("pattern", synthetic.PATTERNS),
                          ("shape", synthetic.SHAPES)):
        adjectives = scene.mllm_caption.split(" with ")[0].split(" on ")[0]  # before the part / base phrases
        said = [i for i, name in enumerate(names) if name in _words(adjectives)]
        found += [(factor, i == getattr(concept, factor)) for i in said]
    kinds = [i for i, kind in enumerate(synthetic.PART_KINDS) if kind in words]
    found += [("part", i == concept.part_kind) for i in kinds]
    return found


def test_look_phrase_words_the_chosen_part_values_in_a_fixed_order():
    concept = synthetic.ConceptClass("dafo", shape=1, colour=5, pattern=1, part_kind=0, part_colour=2, part_size=0,
                                     part_side=0, base=2)
    assert synthetic.look_phrase(concept, "dafo") == \
        "an orange, striped, square dafo with a small blue disc on top on two wheels"
    assert synthetic.look_phrase(concept, "object", ["base", "shape"], brief=True) == \
        "a square object on two wheels"
    assert synthetic.look_phrase(concept, "toy", ["part"], brief=True) == "a toy with a blue disc"
    no_base = synthetic.ConceptClass("dafo", 0, 0, 0, 1, 1, 1, 2, base=0)
    assert synthetic.look_phrase(no_base, "dafo") == "a red, plain, round dafo with a large green spike on its right side"


def test_holistic_mllm_captions_mention_some_part_values_mostly_right_and_never_other_names():
    scenes = synthetic.generate_scenes("train", 0, 1500)
    cat = synthetic.catalogue()
    all_names = set(cat.class_names("seen")) | set(cat.class_names("novel"))
    mention_counts, right, said = [], 0, 0
    for scene in scenes:
        names = {o.concept.name for o in scene.objects}
        assert _words(scene.mllm_caption) & all_names <= names, scene.mllm_caption  # only the scene's classes
        assert "body" not in _words(scene.mllm_caption)  # holistic: no part-by-part phrases
        if len(scene.objects) == 1:
            found = _mentioned_values(scene)
            mention_counts.append(len(found))
            right += sum(ok for _, ok in found)
            said += len(found)
    mention_counts = np.array(mention_counts)
    # Each of the 4 checked values is mentioned with MENTION_PROB: some captions mention none, most several.
    assert 0.0 < (mention_counts == 0).mean() < 0.1 and mention_counts.mean() == pytest.approx(
        4 * synthetic.MENTION_PROB, abs=0.25)
    # A few mentioned values are wrong (MLLM noise), most are right.
    assert 1 - synthetic.WRONG_PROB - 0.05 < right / said < 1 - synthetic.WRONG_PROB + 0.05
    # Some captions call the object by its name, others by a generic noun.
    named = np.mean([s.objects[0].concept.name in _words(s.mllm_caption) for s in scenes if len(s.objects) == 1])
    assert named == pytest.approx(synthetic.NAME_PROB, abs=0.07)


def test_names_only_mllm_captions_are_the_strict_world_with_the_same_images_and_regions(train_scenes):
    strict = synthetic.generate_scenes("train", 0, len(train_scenes), mllm_captions="names_only")
    attribute_words = set(synthetic.ATTRIBUTE_WORDS) - {"top", "left", "right"}
    for holistic, scene in zip(train_scenes, strict):
        assert not _words(scene.mllm_caption) & attribute_words, scene.mllm_caption
        assert {o.concept.name for o in scene.objects} <= _words(scene.mllm_caption)
        assert np.array_equal(holistic.image, scene.image)
        assert (holistic.caption, holistic.regions) == (scene.caption, scene.regions)
    with pytest.raises(ValueError, match="mllm_captions must be one of"):
        synthetic.generate_scenes("train", 0, 1, mllm_captions="llava")


def test_training_data_never_shows_a_novel_class():
    cat = synthetic.catalogue()
    novel_names = set(cat.class_names("novel"))
    novel_combinations = {c.attributes for c in cat.novel}
    for split, count in (("train", 600), ("validation", 300)):
        for scene in synthetic.generate_scenes(split, 0, count):
            assert all(o.concept in cat.seen and o.concept.attributes not in novel_combinations
                       for o in scene.objects)
            texts = [scene.caption, scene.mllm_caption] + [r["description"] for r in scene.regions]
            words = {w.strip(",.:") for t in texts for w in t.split()}
            assert not words & novel_names
    novel = synthetic.generate_scenes("novel", 0, 2 * len(cat.novel))
    assert [len(s.objects) for s in novel] == [1] * len(novel)
    assert [s.objects[0].concept for s in novel] == list(cat.novel) * 2


def test_unnamed_objects_are_new_combinations_called_object_and_leave_other_images_unchanged(train_scenes):
    cat = synthetic.catalogue()
    seen = np.array([c.attributes for c in cat.seen])
    novel = np.array([c.attributes for c in cat.novel])
    names = set(cat.class_names("seen")) | set(cat.class_names("novel"))
    scenes = synthetic.generate_scenes("train", 0, len(train_scenes), unnamed_prob=0.3, with_labels=True)
    unnamed = [o for s in scenes for o in s.objects if o.concept.name == synthetic.UNNAMED]
    assert len(unnamed) / sum(len(s.objects) for s in scenes) == pytest.approx(0.3, abs=0.05)
    rows = np.array([o.concept.attributes for o in unnamed])
    assert synthetic._distances(rows, seen).min() >= 1 and synthetic._distances(rows, novel).min() >= 2
    assert len({tuple(r) for r in rows}) > 0.8 * len(rows)  # random combinations, not a few fixed ones
    for before, scene in zip(train_scenes, scenes):
        if all(o.concept.name != synthetic.UNNAMED for o in scene.objects):
            # The images of the world without them (texts are later draws of the same streams).
            assert np.array_equal(before.image, scene.image)
            continue
        # Drawn with their own part values (every label of the drawn pixels is there) ...
        for o, labels in zip(scene.objects, scene.labels):
            assert (labels > 0).any()
        # ... and in every text only by the generic name, next to the named objects' names.
        texts = [scene.caption, scene.mllm_caption] + [r["description"] for r in scene.regions]
        words = {w.strip(",.:") for t in texts for w in t.split()}
        assert words & names <= {o.concept.name for o in scene.objects}
        assert synthetic.UNNAMED in _words(scene.caption)
    assert synthetic.generate_scenes("novel", 0, 10, unnamed_prob=0.3)[3].image.tobytes() == \
        synthetic.generate_scenes("novel", 0, 10)[3].image.tobytes()  # zero-shot splits never change
    with pytest.raises(ValueError, match="unnamed_prob must be in"):
        synthetic.generate_scenes("train", 0, 1, unnamed_prob=1.0)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_seen_classes >= 6"):
        synthetic.catalogue(0, 4, 3)
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic.generate_scenes("test", 0, 1)
    with pytest.raises(ValueError, match="resolution must be >= 32"):
        synthetic.generate_scenes("train", 0, 1, resolution=16)
    with pytest.raises(ValueError, match="unnamed_prob must be in"):  # before anything is written
        synthetic.ensure_synthetic(tmp_path / "unnamed", num_train=8, unnamed_prob=-0.1)
    assert not (tmp_path / "unnamed").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no synthetic benchmark"):
        synthetic.ensure_synthetic(tmp_path / "foreign", num_train=8)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_ensure_synthetic_writes_records_zeroshot_folders_and_caches(tmp_path):
    directory = tmp_path / "bench"
    sizes = dict(num_train=24, num_validation=6, num_test_per_class=2, seed=3, num_workers=0, **SMALL)
    assert synthetic.ensure_synthetic(directory, **sizes) == str(directory)
    cat = synthetic.catalogue(3, **SMALL)

    builder = tfds.builder_from_directory(os.fspath(directory))
    assert builder.info.splits["train"].num_examples == 24 and builder.info.splits["validation"].num_examples == 6
    record = builder.as_data_source("train")[5]
    scene, = synthetic.generate_scenes("train", 5, 1, seed=3, **SMALL)
    assert record["id"].decode() == scene.id and record["image"].shape == (64, 64, 3)
    assert tokenizer.decode(record["caption_tokens"]) == tokenizer.decode(tokenizer.tokenize(scene.caption)[0])
    assert int(record["box_mask"].sum()) == len(scene.regions)
    first = scene.regions[0]["box"]  # highest score first; stored as cxcywh
    np.testing.assert_allclose(record["boxes"][0], [(first[0] + first[2]) / 2, (first[1] + first[3]) / 2,
                                                    first[2] - first[0], first[3] - first[1]], atol=1e-6)

    for split in ("seen", "novel"):
        folder = directory / "zeroshot" / split
        assert sorted(os.listdir(folder)) == cat.class_names(split)
        assert all(sorted(os.listdir(folder / name)) == ["0000.jpg", "0001.jpg"] for name in cat.class_names(split))
        with open(directory / "zeroshot" / f"descriptors_{split}.json") as f:
            descriptors = json.load(f)
        assert list(descriptors) == cat.class_names(split) and descriptors == cat.descriptors(split)
        data = datasets.classification_dataset(f"synthetic:{split}", synthetic_dir=os.fspath(directory))
        assert data.class_names == cat.class_names(split) and data.descriptors == cat.descriptors(split)
    assert not [p for p in os.listdir(tmp_path) if p != "bench"]  # no staging directory left behind

    marker = directory / synthetic.MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    synthetic.ensure_synthetic(directory, **dict(sizes, num_workers=2))  # workers do not change the output
    assert marker.stat().st_mtime_ns == stamp
    synthetic.ensure_synthetic(directory, **dict(sizes, num_train=12))  # other arguments: regenerated
    assert tfds.builder_from_directory(os.fspath(directory)).info.splits["train"].num_examples == 12
    assert json.loads(marker.read_text())["arguments"]["num_train"] == 12
    assert not [p for p in os.listdir(tmp_path) if p != "bench"]
