"""Inference: load a checkpoint, embed images and texts, ground, classify (see ``model``).

    m = grain_jax.inference.load("workdir")          # or "random:grain-tiny" (random init)
    clf = m.classifier(["cat", "dog"], descriptors={"cat": ["whiskers"], "dog": ["a snout"]})
    probs = m.classify(uint8_images, clf)             # [N, C]

Modules: ``model`` (``InferenceModel``, ``load``), ``classifier`` (class embeddings from
``prompts`` templates and ``descriptors``), ``batching`` (fixed-size padded batches), ``objective`` (forward +
loss of a batch: the train step's and the validation evaluator's).
The evaluators, integrations and binaries build on this package; it imports none of them.
"""
from grain_jax.inference.classifier import Classifier
from grain_jax.inference.model import InferenceModel, load, preprocess_image, preprocess_images, to_host

__all__ = ["Classifier", "InferenceModel", "load", "preprocess_image", "preprocess_images", "to_host"]
