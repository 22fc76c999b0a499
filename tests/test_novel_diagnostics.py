"""benchmarks/novel_diagnostics.py without training: probe texts, names, object patches, attention capture."""
import importlib.util
import os

import numpy as np
import pytest

import _train_utils
from grain_jax import inference
from grain_jax.data import synthetic, tokenizer


def _diagnostics():
    spec = importlib.util.spec_from_file_location(
        "novel_diagnostics", os.path.join(_train_utils.REPO, "benchmarks", "novel_diagnostics.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


diag = _diagnostics()


@pytest.mark.parametrize("style", ["caption", "descriptor"])
def test_probe_texts_name_one_value_each_in_factor_order(style):
    for factor, (values, _, _) in diag.PROBES.items():
        texts = diag.probe_texts(factor, style)
        assert len(texts) == len(values) == len(set(texts))
        for value, text in zip(values, texts):
            assert diag._BASE_WORDS[value][style != "caption"] in text if factor == "base" else value in text


def test_caption_style_mentions_every_part_value_and_no_name():
    for concept in synthetic.catalogue().novel:
        text = diag.caption_style(concept)
        assert concept.name not in text and text.startswith("a ")
        for factor, values in (("colour", synthetic.COLOUR_NAMES), ("pattern", synthetic.PATTERNS),
                               ("shape", synthetic.SHAPES), ("part_kind", synthetic.PART_KINDS),
                               ("part_size", synthetic.PART_SIZES)):
            assert values[getattr(concept, factor)] in text
        assert ("stand" in text or "legs" in text or "wheels" in text) == (concept.base != 0)


def test_nearest_seen_classes_and_wrong_value_shares():
    cat = synthetic.catalogue()
    assert diag.nearest_seen(cat, cat.seen[3]) == [cat.seen[3]]
    novel = cat.novel[0]
    nearest = diag.nearest_seen(cat, novel)
    distance = [sum(a != b for a, b in zip(c.attributes, novel.attributes)) for c in cat.seen]
    assert {c.name for c in nearest} == {c.name for c, d in zip(cat.seen, distance) if d == min(distance)}
    assert min(distance) >= 2  # the generator's rule for novel classes
    # Wrong answers that always name the pattern of the seen class an image is read as.
    other = next(c for c in cat.seen if c.pattern != novel.pattern)
    concepts, assigned = [novel] * 4, [other] * 4
    pred = np.array([novel.pattern, other.pattern, other.pattern, other.pattern])
    shares = diag.wrong_value_shares(cat, concepts, assigned, "pattern", pred)
    assert shares["wrong"] == 0.75 and shares["wrong_count"] == 3
    assert shares["assigned"] == 1.0 and shares["assigned_chance"] == pytest.approx(1 / 3)  # 4 patterns
    right = diag.wrong_value_shares(cat, concepts, [novel] * 4, "pattern", pred)  # "read as" its own class
    assert right["assigned"] == right["assigned_chance"] == 0.0
    world = diag.nearest_value_shares(cat)
    assert set(world) == {f for f, _ in synthetic.FACTORS}
    patterns = [c.pattern for c in cat.seen]
    assert world["pattern"]["any_seen"] == pytest.approx(np.mean([patterns.count(c.pattern) / 40 for c in cat.novel]))
    assert 0 <= world["base"]["nearest_others"] <= 1


def test_draw_names_excludes_given_names_and_trained_tokens():
    trained = diag.trained_tokens(0, 64, scenes=100)
    seen = set(synthetic.catalogue().class_names("seen"))
    names = diag.draw_names(10, seen, draw=0, trained=trained)
    assert len(set(names)) == 10 and not set(names) & seen
    tok = tokenizer.default_tokenizer()
    assert not {t for n in names for t in tok.encode(n)} & trained
    assert diag.draw_names(10, seen, draw=0) != diag.draw_names(10, seen, draw=1)  # other draws, other names


def test_object_patches_and_attention_summary():
    labels = np.zeros((1, 1, 16, 16), np.uint8)
    labels[0, 0, 0:3, 0:3] = 2  # touches patches (0, 0) and (0, 1)... of an 8-px grid: only patch 0
    labels[0, 0, 9, 9] = 1  # patch (1, 1)
    on_object = diag.object_patches(labels, 8)
    assert on_object.tolist() == [[True, False, False, True]]
    uniform = {"global": np.full((1, 5), 0.2), "regions": np.full((1, 2, 5), 0.2)}
    summary = diag.attention_summary(uniform, on_object)
    assert summary["global/effective_tokens"] == pytest.approx(5)
    assert summary["global/object_mass"] == pytest.approx(0.4) and summary["regions/cls_mass"] == pytest.approx(0.2)
    peaked = {"global": np.array([[0.0, 1.0, 0.0, 0.0, 0.0]])}
    assert diag.attention_summary(peaked, on_object)["global/effective_tokens"] == pytest.approx(1)


@pytest.mark.parametrize("name", ["grain-tiny", "clip-tiny"])
def test_attention_maps_are_distributions_over_cls_and_patches(name):
    model = inference.load(f"random:{name}", image_size=32, decoder_layers=2)
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    maps = diag.attention_maps(model, images)
    patches = (32 // 8) ** 2
    assert maps["global"].shape == (2, 1 + patches)
    if name == "grain-tiny":
        assert maps["regions"].shape == (2, model.model.num_queries, 1 + patches)
        assert maps["global_layer0"].shape == (2, 1 + patches)
    for probs in maps.values():
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
