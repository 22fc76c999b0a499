"""Zero-shot classifiers as the reference builds them: class embeddings from prompts and descriptors,
and the reference's region score (our_eval.py)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.inference import descriptors as descriptors_lib
from grain_jax.inference import prompts
from grain_jax.losses.contrastive import l2_normalize


@dataclasses.dataclass
class Classifier:
    """Zero-shot class embeddings (reusable across ``classify`` calls).

    Attributes:
      class_names: [C] the classes' names (in the prompts unless built ``name_free``).
      embeddings: [C, D] mean of the L2-normalised prompt embeddings (re-normalised only
        if ``renormalize``; the reference does not).
      descriptor_embeddings: [C, K, D] L2-normalised raw descriptors (zero padded), for
        region scoring; None without descriptors.
      descriptor_mask: [C, K] bool, True for real descriptors.
    """
    class_names: list[str]
    embeddings: np.ndarray
    descriptor_embeddings: np.ndarray | None = None
    descriptor_mask: np.ndarray | None = None


def region_scores(regions: jax.Array, desc: jax.Array, desc_mask: jax.Array) -> jax.Array:
    """our_eval.py's region score: mean over queries of max over a class's descriptors.

    regions [B, Q, D], desc [C, K, D] (both normalised), desc_mask [C, K] -> [B, C]; a class
    without descriptors scores 0.
    """
    sims = jnp.einsum("bqd,ckd->bqck", regions, desc)
    sims = jnp.where(desc_mask[None, None], sims, -jnp.inf).max(-1).mean(1)
    return jnp.where(desc_mask.any(-1)[None], sims, 0.0)


def build(encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
          descriptors: Mapping[str, Sequence[str]] | None = None, templates: str | Sequence[str] = "ref46", *,
          dataset: str | None = None, renormalize: bool = False, name_free: bool = False,
          chunk_prompts: int = 8192) -> Classifier:
    """See ``InferenceModel.classifier``; ``encode_texts``: list of N strings -> L2-normalised [N, D]."""
    class_names = list(class_names)
    templates = prompts.get_templates(templates, dataset)
    if descriptors is not None:
        missing = [c for c in class_names if c not in descriptors]
        if missing:
            raise ValueError(f"descriptors lack classes {missing[:20]}")
        descriptors = {c: list(descriptors[c]) for c in class_names}
        if name_free:
            descriptors = {c: [prompts.remove_name(d, c) for d in ds] for c, ds in descriptors.items()}
    if name_free:  # each template's name slot becomes the neutral word, its article agreeing ("an object")
        templates = [prompts.remove_name(t, "{}") for t in templates]
    per_class = [descriptors_lib.class_prompts(c, descriptors[c] if descriptors else None, templates)
                 for c in class_names]
    embeddings = _mean_embeddings(encode_texts, per_class, chunk_prompts)
    if renormalize:
        embeddings = np.asarray(l2_normalize(embeddings))
    clf = Classifier(class_names, embeddings)
    if descriptors is not None:
        raw = [list(descriptors[c]) for c in class_names]
        k = max(1, max(len(r) for r in raw))
        flat = encode_texts([d for r in raw for d in r])
        clf.descriptor_embeddings = np.zeros((len(raw), k, flat.shape[-1]), np.float32)
        clf.descriptor_mask = np.zeros((len(raw), k), bool)
        offset = 0
        for c, r in enumerate(raw):
            clf.descriptor_embeddings[c, :len(r)] = flat[offset:offset + len(r)]
            clf.descriptor_mask[c, :len(r)] = True
            offset += len(r)
    return clf


def _mean_embeddings(encode_texts: Callable[[list[str]], np.ndarray], per_class: list[list[str]],
                     chunk_prompts: int) -> np.ndarray:
    """Mean of the normalised embeddings of each class's prompts, encoding a few
    thousand prompts at a time (ImageNet x ref46 x descriptors is ~300k prompts)."""
    sums, start = None, 0
    while start < len(per_class):
        stop, count = start, 0
        while stop < len(per_class) and (count == 0 or count + len(per_class[stop]) <= chunk_prompts):
            count += len(per_class[stop])
            stop += 1
        flat = encode_texts([p for ps in per_class[start:stop] for p in ps])
        if sums is None:
            sums = np.zeros((len(per_class), flat.shape[-1]), np.float64)
        owner = np.repeat(np.arange(start, stop), [len(ps) for ps in per_class[start:stop]])
        np.add.at(sums, owner, flat)
        start = stop
    counts = np.asarray([len(ps) for ps in per_class], np.float64)[:, None]
    return (sums / counts).astype(np.float32)


def concatenate(first: Classifier, second: Classifier) -> Classifier:
    """Both classifiers' classes in one (``first``'s C1 then ``second``'s C2), so that one image pass scores
    both: [C1 + C2, D] embeddings, descriptors zero padded to the larger K."""
    embeddings = np.concatenate([first.embeddings, second.embeddings])
    if (first.descriptor_embeddings is None) != (second.descriptor_embeddings is None):
        raise ValueError("cannot concatenate a classifier with descriptors and one without")
    if first.descriptor_embeddings is None:
        return Classifier(first.class_names + second.class_names, embeddings)
    k = max(first.descriptor_mask.shape[1], second.descriptor_mask.shape[1])

    def pad(x):
        return np.pad(x, [(0, 0), (0, k - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return Classifier(first.class_names + second.class_names, embeddings,
                      np.concatenate([pad(first.descriptor_embeddings), pad(second.descriptor_embeddings)]),
                      np.concatenate([pad(first.descriptor_mask), pad(second.descriptor_mask)]))
