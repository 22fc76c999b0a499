"""Inference API: load a checkpoint, embed images and texts, ground, classify.

    m = grain_jax.inference.load("workdir")          # or "random:grain-tiny" (random init)
    img = m.encode_images(uint8_images)               # [N, D] L2-normalised
    txt = m.encode_texts(["a photo of a dog"])        # [N, D] L2-normalised
    g = m.ground(uint8_images)                        # boxes / region_embeddings / image_embedding
    clf = m.classifier(["cat", "dog"], descriptors={"cat": ["whiskers"], "dog": ["a snout"]})
    probs = m.classify(uint8_images, clf)             # [N, C]

Images are preprocessed like training: squash-resized to ``spec.image_size`` (bicubic) on
the host, sent as uint8 and normalised on device with ``spec.mean`` / ``spec.std``
(``data.transforms``, the same code as the train step). Work runs in fixed-size batches (zero padding,
results sliced back) so each jitted function compiles once; with a ``mesh`` the batch is
placed with ``sharding.batch_sharding`` (``("data", "fsdp")`` unless the rules say otherwise) and
parameters follow the model's logical partitioning.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from grain_jax import checkpoints, models, sharding
from grain_jax.checkpoints import ModelSpec
from grain_jax.data import tokenizer, transforms
from grain_jax.inference import classifier as classifier_lib
from grain_jax.inference.batching import fixed_size_batches, round_up
from grain_jax.inference.classifier import Classifier
from grain_jax.losses.contrastive import l2_normalize


def preprocess_image(image: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 [H, W, C] (C in 1, 3, 4, or [H, W]) -> uint8 [S, S, 3] squash-resized like training.

    Normalisation happens on device (``transforms.normalize`` in the jitted encoder)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, 1|3|4], got {image.shape}")
    image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    return transforms.squash_resize(np.ascontiguousarray(image), spec.image_size)


def preprocess_images(images, spec: ModelSpec) -> np.ndarray:
    """uint8 [N, H, W, 3] / a list of uint8 images of any sizes -> uint8 [N, S, S, 3];
    float input is taken as already normalised and must be [N, S, S, 3]."""
    expected = (spec.image_size, spec.image_size, 3)
    if isinstance(images, np.ndarray | jax.Array) and np.asarray(images).dtype != np.uint8:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"float images must be normalised [N, {expected[0]}, {expected[1]}, 3], "
                             f"got {images.shape}")
        return images
    return np.stack([preprocess_image(im, spec) for im in images]) if len(images) else np.zeros((0,) + expected,
                                                                                                np.uint8)


@functools.lru_cache(maxsize=32)
def _compiled(model: nn.Module, mesh: Mesh | None, rules: tuple, mean: tuple, std: tuple):
    """Jitted encoders for one (model, mesh, image statistics); cached so a new InferenceModel
    per eval (e.g. every training eval step) reuses the compiled code."""

    def encode_image(params, images):
        pixels = transforms.normalize(images, mean, std)  # uint8 -> model input; float passes as is
        out = model.apply({"params": params}, pixels, method="encode_image")
        result = {"image_embedding": l2_normalize(out["img/embedding"])}
        if "dec/region_embeddings" in out:
            result["region_embeddings"] = l2_normalize(out["dec/region_embeddings"])
            result["boxes"] = out["dec/boxes"].astype(jnp.float32)
        return result

    def encode_text(params, tokens):
        return l2_normalize(model.apply({"params": params}, tokens, method="encode_text"))

    def scores(image_out, class_embeddings, desc, desc_mask):
        global_scores = image_out["image_embedding"] @ class_embeddings.T
        if desc is None or "region_embeddings" not in image_out:
            return global_scores, None
        return global_scores, classifier_lib.region_scores(image_out["region_embeddings"], desc, desc_mask)

    return jax.jit(encode_image), jax.jit(encode_text), jax.jit(scores)


def to_host(tree):
    """Device outputs -> numpy on every process (gathers when not fully addressable)."""
    def get(x):
        return np.asarray(x) if x.is_fully_addressable else np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(get, tree)


class InferenceModel:
    """A model, its parameters and its preprocessing, with batched jitted helpers.

    Args:
      model: a grain_jax model (``mode`` "grain" or "clip").
      params: its parameters (unboxed pytree; sharded or not).
      spec: the checkpoint's ModelSpec (image size, mean/std, text length).
      mesh: optional ``("data", "fsdp", "tensor")`` mesh; batches are placed with
        ``sharding.batch_sharding(mesh, rules)``. ``None`` runs on the default device.
      batch_size: images per jitted call (rounded up to the number of batch shards).
      text_batch_size: texts per jitted call.
      rules: extra logical-axis rules (``config.sharding_rules``).
    """

    def __init__(self, model: nn.Module, params, spec: ModelSpec, mesh: Mesh | None = None, *,
                 batch_size: int = 64, text_batch_size: int = 256, rules: Sequence = ()):
        self.model, self.params, self.spec, self.mesh = model, params, spec, mesh
        self.mode, self.has_grounding = model.mode, model.has_grounding  # mode: reported; has_grounding: decides
        self.rules = sharding.axis_rules(rules)
        self.batch_sharding = None if mesh is None else sharding.batch_sharding(mesh, self.rules)
        shards = 1 if mesh is None else sharding.batch_shards(mesh.shape, self.rules)
        self.batch_size = round_up(batch_size, shards)
        self.text_batch_size = round_up(text_batch_size, shards)
        self._encode_image, self._encode_text, self._scores = _compiled(
            model, mesh, self.rules, tuple(spec.mean), tuple(spec.std))

    # ----------------------------------------------------------------- plumbing
    def _call(self, fn, *args):
        """Runs ``fn`` with batch-leading numpy args placed on the mesh (if any)."""
        if self.mesh is None:
            with nn.logical_axis_rules(self.rules):
                return fn(self.params, *args)
        placed = [jax.make_array_from_callback(a.shape, self.batch_sharding, lambda idx, a=a: a[idx])
                  for a in args]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return fn(self.params, *placed)

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned log-scale (the contrastive temperature)."""
        return float(np.exp(np.asarray(jax.tree.leaves(self.params["logit_scale"])[0], np.float32)))

    # ----------------------------------------------------------------- images
    def _image_batches(self, images):
        """Yields (device outputs of encode_image for one fixed-size batch, number of real rows)."""
        pixels = preprocess_images(images, self.spec)
        for chunk, n in fixed_size_batches(pixels, self.batch_size):
            yield self._call(self._encode_image, chunk), n

    def _image_outputs(self, images) -> dict[str, np.ndarray]:
        parts = [jax.tree.map(lambda x, n=n: x[:n], to_host(out)) for out, n in self._image_batches(images)]
        if not parts:
            raise ValueError("no images given")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def encode_images(self, images) -> np.ndarray:
        """uint8 [N, H, W, 3] (any size; or a list of uint8 images) or normalised float
        [N, S, S, 3] -> L2-normalised [N, D] (GRAIN: global query; CLIP: CLS projection)."""
        return self._image_outputs(images)["image_embedding"]

    def ground(self, images) -> dict[str, np.ndarray]:
        """GRAIN only: ``boxes`` [N, Q, 4] cxcywh in [0, 1], ``region_embeddings`` [N, Q, D]
        and ``image_embedding`` [N, D] (both L2-normalised)."""
        if not self.has_grounding:
            raise ValueError(f"ground() needs a GRAIN model; {self.spec.model_name} is mode {self.mode!r}")
        return self._image_outputs(images)

    # ----------------------------------------------------------------- texts
    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """CLIP BPE ids [N, spec.caption_length] (over-long texts are truncated, EOT kept)."""
        if isinstance(texts, str):
            raise TypeError("encode_texts expects a list of strings, got a single str")
        return tokenizer.tokenize(list(texts), context_length=self.spec.caption_length)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """list of N strings -> L2-normalised [N, D]."""
        return self.encode_tokens(self.tokenize(texts))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """BPE ids [N, L] (``tokenize``) -> L2-normalised [N, D]."""
        tokens = np.asarray(tokens, np.int32)
        if not len(tokens):
            return np.zeros((0, getattr(self.model, "embed_dim", 0)), np.float32)
        parts = [to_host(self._call(self._encode_text, chunk))[:n]
                 for chunk, n in fixed_size_batches(tokens, self.text_batch_size)]
        return np.concatenate(parts)

    # ----------------------------------------------------------------- zero-shot
    def classifier(self, class_names: Sequence[str], descriptors: Mapping[str, Sequence[str]] | None = None,
                   templates: str | Sequence[str] = "ref46", *, dataset: str | None = None,
                   renormalize: bool = False, name_free: bool = False, chunk_prompts: int = 8192) -> Classifier:
        """Class embeddings as the reference builds them.

        For each class, every template x every descriptor sentence (templates alone when
        the class has no descriptors) is encoded, L2-normalised and averaged. The mean is
        not re-normalised unless ``renormalize`` (the reference does not; argmax over
        classes then also weighs how well a class's prompts agree).

        Args:
          class_names: [C] names, in label order.
          descriptors: optional ``{class_name: [descriptor, ...]}`` (keys = class_names).
          templates: a template-set name (see ``inference.prompts``) or a list.
          dataset: picks the set when ``templates="per_dataset"``.
          name_free: the same prompts with each class name replaced by ``prompts.NEUTRAL_NAME``
            ("object"), in the templates and wherever a descriptor mentions it (``prompts.remove_name``).
        """
        return classifier_lib.build(self.encode_texts, class_names, descriptors, templates, dataset=dataset,
                                    renormalize=renormalize, name_free=name_free, chunk_prompts=chunk_prompts)

    def score_parts(self, images, classifier: Classifier) -> tuple[np.ndarray, np.ndarray | None]:
        """(global scores [N, C] = image embedding . class embedding, region scores [N, C]
        as in the reference's our_eval.py, or None without descriptors / for CLIP)."""
        desc = classifier.descriptor_embeddings if self.has_grounding else None
        mask = classifier.descriptor_mask if desc is not None else None
        global_parts, region_parts = [], []
        for out, n in self._image_batches(images):
            g, r = to_host(self._scores(out, classifier.embeddings, desc, mask))
            global_parts.append(g[:n])
            if r is not None:
                region_parts.append(r[:n])
        return np.concatenate(global_parts), (np.concatenate(region_parts) if region_parts else None)

    def scores(self, images, classifier: Classifier, alpha: float = 1.0) -> np.ndarray:
        """alpha * global + (1 - alpha) * region scores, [N, C] (alpha=1: pure global)."""
        global_scores, region_scores = self.score_parts(images, classifier)
        if alpha == 1.0:
            return global_scores
        if region_scores is None:
            raise ValueError("alpha < 1 needs a GRAIN model and a classifier built with descriptors")
        return alpha * global_scores + (1.0 - alpha) * region_scores

    def classify(self, images, classifier: Classifier, alpha: float = 1.0) -> np.ndarray:
        """Class probabilities [N, C]: softmax of the scores times the learned logit scale."""
        return np.asarray(jax.nn.softmax(self.logit_scale * self.scores(images, classifier, alpha), axis=-1))


# --------------------------------------------------------------------- loading
def abstract_params(model: nn.Module, mesh: Mesh | None, rules: tuple):
    """Unboxed ``jax.ShapeDtypeStruct`` params with the shardings inference uses."""
    boxed = models.abstract_params(model)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nn.unbox(boxed))
    else:
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return sharding.abstract_arrays(nn.unbox(boxed), shardings)


def load(path_or_name: str, *, mesh: Mesh | None = None, step: int | None = None, seed: int = 0,
         rules: Sequence = (), batch_size: int = 64, **model_overrides) -> InferenceModel:
    """An InferenceModel from a checkpoint directory or ``"random:<model name>"``.

    Args:
      path_or_name: a directory with ``model_config.json`` + ``checkpoints/`` (training
        or conversion output), or ``random:<name>`` for a randomly initialised model.
      step: checkpoint step (default: latest).
      seed: init seed for ``random:``.
      model_overrides: for ``random:`` only, e.g. ``image_size=64``.
    """
    extra_rules, rules = tuple(rules), sharding.axis_rules(rules)
    if path_or_name.startswith("random:"):
        name = path_or_name.split(":", 1)[1]
        model = ModelSpec(model_name=name, model_overrides=dict(model_overrides)).create_model()
        text_length = min(77, int(getattr(model, "context_length", 77)))
        spec = ModelSpec(model_name=name, model_overrides=dict(model_overrides),
                         image_size=int(getattr(model, "image_size", 224)), caption_length=text_length,
                         description_length=text_length)
        init = lambda key: nn.unbox(models.init_params(model, key))  # noqa: E731
        shardings = None if mesh is None else jax.tree.map(lambda x: x.sharding, abstract_params(model, mesh, rules))
        with nn.logical_axis_rules(rules):
            params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    else:
        if model_overrides:
            raise ValueError(f"model overrides {sorted(model_overrides)} only apply to random: models; a "
                             "checkpoint's model_config.json defines its model")
        spec = checkpoints.read_model_spec(path_or_name)
        model = spec.create_model()
        params = checkpoints.restore_params(path_or_name, abstract_params(model, mesh, rules), step=step)
    return InferenceModel(model, params, spec, mesh, rules=extra_rules, batch_size=batch_size)
