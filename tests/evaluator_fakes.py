"""Built-to-be-perfect / built-to-be-wrong fake models for the evaluator tests (big_vision style).

An image's label is written into its pixels (a constant image of value 20 * label + 10);
a text's label is the class whose marker token it contains. The perfect model embeds
both as one_hot(label), so zero-shot top-1 and Recall@1 must be exactly 1.0; the wrong
model ignores the image and always ranks the classes 0, 1, 2, ... (exactly chance on a
balanced dataset).
"""
from __future__ import annotations

import io
import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from PIL import Image

from grain_jax.checkpoints import ModelSpec
from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NAMES = [str(i) for i in range(10)]  # digits: one BPE token each, absent from templates
DESCRIPTORS = {n: ["whiskers", "a long tail", "has stripes"][: 1 + int(n) % 3] for n in NAMES}


PIXEL_STEP = 20
EMBED_DIM = 16
IMAGE_SIZE = 8


def label_image(label: int, size: int = 12) -> np.ndarray:
    """uint8 [size, size, 3] image that encodes ``label``."""
    return np.full((size, size, 3), PIXEL_STEP * label + PIXEL_STEP // 2, np.uint8)


class LabelModel(nn.Module):
    """Embeds images and texts as one_hot(label) [D].

    Attributes:
      marker_tokens: [C] the token id that marks class c in a text.
      wrong: ignore the image and always score classes in the order 0, 1, 2, ...
    """
    marker_tokens: tuple[int, ...]
    wrong: bool = False
    mode: str = "grain"
    num_queries: int = 3
    embed_dim: int = EMBED_DIM

    @property
    def has_grounding(self) -> bool:
        return self.mode == "grain"

    def setup(self):
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(10.0)), ())

    def __call__(self, images, caption_tokens, description_tokens=None, train=False):
        out = self.encode_image(images)
        out["txt/caption"] = self.encode_text(caption_tokens)
        out["logit_scale"] = self.logit_scale
        return out, {}

    def encode_image(self, images):
        pixel = images[:, 0, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        label = jnp.floor(jnp.round(pixel * 255.0) / PIXEL_STEP).astype(jnp.int32)
        embedding = jax_one_hot(label, self.embed_dim)
        if self.wrong:
            ranking = jnp.linspace(1.0, 0.5, self.embed_dim)
            embedding = jnp.broadcast_to(ranking, embedding.shape)
        regions = jnp.repeat(embedding[:, None], self.num_queries, axis=1)
        boxes = jnp.broadcast_to(jnp.asarray([0.5, 0.5, 0.2, 0.2]), regions.shape[:2] + (4,))
        return {"img/embedding": embedding * 3.0, "dec/region_embeddings": regions, "dec/boxes": boxes}

    def encode_text(self, tokens):
        hits = (tokens[:, :, None] == jnp.asarray(self.marker_tokens)[None, None]).any(1)  # [N, C]
        return jax_one_hot(jnp.argmax(hits, axis=-1), self.embed_dim) * 2.0


def jax_one_hot(label, depth):
    return (label[..., None] == jnp.arange(depth)).astype(jnp.float32)


def make_inference_model(class_names, *, wrong=False, mode="grain", mesh=None, batch_size=8):
    """An InferenceModel around LabelModel whose class c is named ``class_names[c]``."""
    import jax
    from grain_jax.inference import InferenceModel

    spec = ModelSpec(model_name="label-fake", image_size=IMAGE_SIZE, caption_length=32)
    probe = InferenceModel(LabelModel(marker_tokens=(0,)), {"logit_scale": jnp.zeros(())}, spec)
    markers = tuple(int(t[1]) for t in probe.tokenize(list(class_names)))  # the first BPE id after SOT
    assert len(set(markers)) == len(markers), "class names must start with distinct tokens"
    model = LabelModel(marker_tokens=markers, wrong=wrong, mode=mode)
    params = model.init(jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
                        jnp.zeros((1, 32), jnp.int32))["params"]
    return InferenceModel(model, params, spec, mesh, batch_size=batch_size, text_batch_size=64)


def write_folder(root, per_class=2, names=NAMES, descriptor_file=None):
    """ImageFolder with ``per_class`` label images per class (sizes vary)."""
    for label, name in enumerate(names):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            size = 9 + i * 5
            Image.fromarray(label_image(label, size)).save(os.path.join(root, name, f"{i}.png"))
    if descriptor_file is not None:
        with open(os.path.join(root, "descriptors.json"), "w") as f:
            json.dump(descriptor_file, f)
    return str(root)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def write_prepared_tfds(directory, features, examples, split) -> str:
    """A TFDS-prepared ArrayRecord directory (what ``tfds build --file_format=array_record`` leaves),
    written without TensorFlow through grain_jax.data.records."""
    from grain_jax.data import records

    os.makedirs(directory)
    shard = os.path.join(directory, f"{split}.tmp_shard")
    num_bytes = records.write_shard(shard, [features.serialize_example(e) for e in examples])
    records.publish_split(directory, split, [shard])
    records.write_tfds_metadata(directory, features, {split: [len(examples)]}, {split: num_bytes}, "test data")
    return str(directory)
