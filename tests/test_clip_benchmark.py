"""CLIP_benchmark plug-in: `clip_benchmark eval` runs on a random GRAIN checkpoint (random
reference modules, converted) over tiny local WebDataset shards, and its metrics equal
the ones computed directly with grain_jax.inference."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_convert_torch_reference import build_reference

from grain_jax import inference
from grain_jax.cli import clip_benchmark as clip_benchmark_cli
from grain_jax.convert import reference
from grain_jax.integrations import clip_benchmark as plugin
from grain_jax.models import create_model

CLASSES = ["red square", "blue circle"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]
CAPTIONS = [["a red thing", "something red"], ["a blue thing", "something blue"], ["a green thing", "green"],
            ["a dark thing", "black"]]


def _images(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 3 * i, 36, 3), dtype=np.uint8) for i in range(n)]


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_wds(root, samples, **metadata):
    """samples: [{ext: bytes}] -> root/test/0.tar + nshards.txt + metadata text files."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for name, text in metadata.items():
        (root / f"{name}.txt").write_text(text)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """Converted rather than randomly initialised: no init compile, and GRAIN mode (image
    embedding from the decoder's global query) goes through the plug-in."""
    import torch
    backbone, decoder = build_reference(create_model("grain-tiny"), seed=3)
    root = tmp_path_factory.mktemp("grain_tiny")
    torch.save({"state_dict": decoder.state_dict(), "backbone_state_dict": backbone.state_dict()}, root / "ckpt.pth")
    reference.convert_file(str(root / "ckpt.pth"), str(root / "converted"), "grain-tiny")
    return str(root / "converted"), inference.load(str(root / "converted"))


def _eval(tmp_path, checkpoint, dataset_root, task, *extra):
    output = tmp_path / f"{task}.json"
    clip_benchmark_cli.run(["eval", "--dataset", "wds/tiny", "--dataset_root", str(dataset_root),
                            "--pretrained", checkpoint, "--model", "grain", "--task", task, "--output", str(output),
                            "--num_workers", "0", "--batch_size", "4", "--no_amp", "--quiet", *extra])
    return json.loads(output.read_text())["metrics"]


def test_zeroshot_classification_matches_direct_inference(tmp_path, random_checkpoint):
    checkpoint, model = random_checkpoint
    images = _images(6)
    # The oracle: grain_jax.inference directly, with CLIP_benchmark's classifier recipe
    # (mean of normalised prompt embeddings, re-normalised).
    prompts = model.encode_texts([t.format(c=c) for c in CLASSES for t in TEMPLATES]).reshape(2, 2, -1).mean(1)
    prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
    predicted = (model.encode_images(images) @ prompts.T).argmax(-1)
    labels = predicted.copy()
    labels[:2] = 1 - labels[:2]  # two deliberate misses -> acc1 = 4/6 if the plug-in agrees
    _write_wds(tmp_path / "cls", [{"png": _png(im), "cls": str(int(y)).encode()} for im, y in zip(images, labels)],
               classnames="\n".join(CLASSES), zeroshot_classification_templates="\n".join(TEMPLATES))
    metrics = _eval(tmp_path, checkpoint, tmp_path / "cls", "zeroshot_classification")
    assert metrics["acc1"] == pytest.approx(4 / 6)


def test_zeroshot_retrieval_matches_direct_inference(tmp_path, random_checkpoint):
    checkpoint, model = random_checkpoint
    images = _images(len(CAPTIONS))
    _write_wds(tmp_path / "ret", [{"png": _png(im), "txt": "\n".join(c).encode()} for im, c in zip(images, CAPTIONS)],
               dataset_type="retrieval")
    metrics = _eval(tmp_path, checkpoint, tmp_path / "ret", "zeroshot_retrieval", "--recall_k", "1", "2")
    scores = model.encode_images(images) @ model.encode_texts([t for c in CAPTIONS for t in c]).T  # [I, T]
    owner = np.repeat(np.arange(len(CAPTIONS)), [len(c) for c in CAPTIONS])
    for k in (1, 2):
        top_images = np.argsort(-scores.T, axis=1)[:, :k]  # per text
        image_recall = np.mean([owner[t] in top_images[t] for t in range(len(owner))])
        top_texts = np.argsort(-scores, axis=1)[:, :k]  # per image
        text_recall = np.mean([np.any(owner[top_texts[i]] == i) for i in range(len(images))])
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(image_recall)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(text_recall)


def test_loader_contract(random_checkpoint):
    checkpoint, model = random_checkpoint
    torch_model, transform, tokenizer = plugin.load_grain_jax("grain", checkpoint)
    image = _images(1)[0]
    pixels = transform(Image.fromarray(image))
    assert tuple(pixels.shape) == (3, model.spec.image_size, model.spec.image_size)
    embedding = torch_model.encode_image(pixels[None]).numpy()
    np.testing.assert_allclose(embedding, model.encode_images([image]), atol=1e-5)
    ids = tokenizer(["a photo of a dog", "a cat"])
    assert ids.dtype == __import__("torch").int64 and tuple(ids.shape) == (2, model.spec.caption_length)
    np.testing.assert_allclose(torch_model.encode_text(ids).numpy(), model.encode_texts(["a photo of a dog", "a cat"]),
                               atol=1e-5)
