"""InferenceModel: preprocessing, padded batching, mesh sharding, class-embedding averaging."""
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import evaluator_fakes as fakes
from grain_jax import inference, sharding
from grain_jax.checkpoints import ModelSpec
from grain_jax.data import pipeline, transforms
from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from grain_jax.inference import classifier, descriptors, prompts

NAMES = fakes.NAMES


@pytest.fixture(scope="module")
def perfect():
    return fakes.make_inference_model(NAMES, batch_size=4)


def test_preprocess_squash_resizes_bicubic_and_device_normalises():
    spec = ModelSpec(model_name="x", image_size=8)
    image = np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((8, 8), Image.BICUBIC))
    np.testing.assert_array_equal(inference.preprocess_image(image, spec), resized)  # uint8 to the device
    expected = (resized / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(transforms.normalize(resized, spec.mean, spec.std)), expected,
                               rtol=1e-6, atol=1e-6)
    grey = inference.preprocess_images([image[..., 0], image], spec)  # any sizes, greyscale -> RGB
    assert grey.shape == (2, 8, 8, 3) and grey.dtype == np.uint8
    assert (grey[0, ..., 0] == grey[0, ..., 1]).all()
    normalised = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(inference.preprocess_images(normalised, spec), normalised)  # passed through
    np.testing.assert_array_equal(np.asarray(transforms.normalize(normalised, spec.mean, spec.std)), normalised)
    with pytest.raises(ValueError, match=r"float images must be normalised \[N, 8, 8, 3\]"):
        inference.preprocess_images(np.zeros((2, 9, 9, 3), np.float32), spec)


def test_serving_sees_the_pixels_training_sees():
    spec = ModelSpec(model_name="x", image_size=8)
    image = np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    options = pipeline._ExampleOptions(image_size=8, caption_length=4, description_length=4, max_boxes=1,
                                       mllm_caption_prob=0.0, augment=False)
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")  # lossless: the record holds exactly these pixels
    record = {"id": b"x", "image": png.getvalue(), "caption_tokens": np.zeros(4, np.int32), "has_mllm_caption": False,
              "description_tokens": np.zeros((1, 4), np.int32), "boxes": np.zeros((1, 4), np.float32),
              "box_mask": np.zeros(1, bool)}
    trained_on = options.example(record, use_mllm_caption=False, flip=False)["images"]
    np.testing.assert_array_equal(inference.preprocess_image(image, spec), trained_on)


def test_uint8_and_prenormalised_float_images_embed_alike(perfect):
    images = np.stack([fakes.label_image(i % 10, size=fakes.IMAGE_SIZE) for i in range(5)])
    pixels = np.asarray(transforms.normalize(images, perfect.spec.mean, perfect.spec.std))
    np.testing.assert_allclose(perfect.encode_images(images), perfect.encode_images(pixels), rtol=1e-6)


def test_padded_batches_return_every_row_once(perfect):
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]  # 11 images, batch 4: last batch padded
    out = perfect.encode_images([fakes.label_image(lab, 10 + i) for i, lab in enumerate(labels)])
    assert out.shape == (11, fakes.EMBED_DIM)
    np.testing.assert_array_equal(out.argmax(1), labels)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    texts = perfect.encode_texts([f"a photo of a {lab}," for lab in labels])
    np.testing.assert_array_equal(texts.argmax(1), labels)


def test_mesh_sharded_batches_give_the_same_embeddings(perfect):
    mesh = sharding.create_mesh((-1, 2, 1))
    sharded = fakes.make_inference_model(NAMES, mesh=mesh, batch_size=6)
    assert sharded.batch_size == 8  # rounded up to the 8 batch shards
    images = np.stack([fakes.label_image(i % 10) for i in range(13)])
    np.testing.assert_array_equal(sharded.encode_images(images), perfect.encode_images(images))
    clf = perfect.classifier(NAMES, fakes.DESCRIPTORS, "short")
    np.testing.assert_allclose(sharded.scores(images, clf, alpha=0.5), perfect.scores(images, clf, alpha=0.5))


def test_classify_probabilities(perfect):
    clf = perfect.classifier(NAMES, templates="short")
    probs = perfect.classify(np.stack([fakes.label_image(i) for i in range(10)]), clf)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), np.arange(10))
    with pytest.raises(ValueError, match="alpha < 1 needs"):
        perfect.scores(np.stack([fakes.label_image(0)]), clf, alpha=0.5)


class BagOfTokens(nn.Module):
    """Text embedding = sum of a random table's rows over the non-zero tokens (numpy-checkable)."""
    mode: str = "clip"
    has_grounding = False  # a text-only fake
    vocab: int = 97

    def setup(self):
        self.table = self.param("table", nn.initializers.normal(1.0), (self.vocab, 6))

    def __call__(self, images, tokens, description_tokens=None):
        return self.encode_text(tokens)

    def encode_text(self, tokens):
        return jnp.where(tokens[..., None] > 0, self.table[tokens % self.vocab], 0).sum(1)


@pytest.mark.parametrize("renormalize", [False, True])
def test_class_embeddings_equal_a_plain_numpy_average(renormalize):
    spec = ModelSpec(model_name="bag", image_size=4, caption_length=24)
    model = BagOfTokens()
    params = model.init(jax.random.key(1), None, jnp.ones((1, 24), jnp.int32))["params"]
    m = inference.InferenceModel(model, params, spec, text_batch_size=16)
    desc = {"ant": ["six legs", "a red body"], "bee": ["stripes"], "cow": []}  # "cow": templates only
    templates = prompts.SHORT
    clf = m.classifier(list(desc), desc, templates, renormalize=renormalize, chunk_prompts=5)  # several chunks

    table = np.asarray(params["table"])
    expected = []
    for name, ds in desc.items():
        tokens = m.tokenize(descriptors.class_prompts(name, ds, templates))
        emb = np.where(tokens[..., None] > 0, table[tokens % 97], 0).sum(1)
        mean = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).mean(0)
        expected.append(mean / np.linalg.norm(mean) if renormalize else mean)
    np.testing.assert_allclose(clf.embeddings, np.stack(expected), rtol=1e-5, atol=1e-6)
    assert clf.descriptor_mask.tolist() == [[True, True], [True, False], [False, False]]
    raw = table[m.tokenize(["six legs"]) % 97][0][m.tokenize(["six legs"])[0] > 0].sum(0)
    np.testing.assert_allclose(clf.descriptor_embeddings[0, 0], raw / np.linalg.norm(raw), rtol=1e-5)


def test_region_scores_follow_our_eval():
    rng = np.random.default_rng(0)
    regions = rng.normal(size=(2, 3, 4)).astype(np.float32)
    desc = rng.normal(size=(3, 2, 4)).astype(np.float32)
    mask = np.array([[True, True], [True, False], [False, False]])
    got = np.asarray(classifier.region_scores(regions, desc, mask))
    sims = np.einsum("bqd,ckd->bqck", regions, desc)
    expected = np.stack([sims[:, :, 0].max(-1).mean(1), sims[:, :, 1, 0].mean(1), np.zeros(2)], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ground_needs_a_grain_model(perfect):
    out = perfect.ground(np.stack([fakes.label_image(2)]))
    assert out["boxes"].shape == (1, 3, 4) and out["region_embeddings"].shape == (1, 3, fakes.EMBED_DIM)
    clip = inference.InferenceModel(BagOfTokens(), {}, ModelSpec(model_name="bag", image_size=4))
    with pytest.raises(ValueError, match="ground\\(\\) needs a GRAIN model"):
        clip.ground(np.zeros((1, 4, 4, 3), np.uint8))
