r"""Why does (or doesn't) the global image embedding recognise the synthetic benchmark's novel classes?

    python benchmarks/novel_diagnostics.py --checkpoints workdirs/abl1000/grain/seed0,workdirs/abl1000/clip/seed0 \
        [--per_class 50] [--seed 0] [--output diag.json]

Cheap, training-free measurements on trained checkpoints (GRAIN or CLIP), each printed as one line and
written to ``--output``. Images are the zero-shot splits' scenes regenerated with their label maps
(``generate_scenes(..., with_labels=True)``: the same pixels before JPEG), texts built as the
zero-shot evaluator builds them (``short`` templates x descriptor sentences, averaged).

* ``top1``: the global embedding's novel top-1 with the evaluator's prompts (sanity check against
  ``final_metrics.json``), and with the same prompts but the class name replaced by "object"
  (``noname``, the evaluator's ``name_free/top1``): what the never-trained novel *name* tokens add or cost;
  ``caption_style``: one prompt per class worded like a holistic MLLM caption ("a red, striped, square
  object with a large green spike on top", ``synthetic.look_phrase``), i.e. the training captions'
  phrasing instead of the reference's descriptor sentences.
* ``text_cos``: mean pairwise cosine between the (normalised) class embeddings of the novel (and seen)
  classes: how separable the classes are in text space.
* ``attr``: attribute probing. For each factor (shape, colour, pattern, attached-part kind, base), the
  value whose single-attribute text ("a red object", "a red body") scores highest against an image, by the
  global embedding and (GRAIN) by the best-matching region embedding; accuracy over seen and novel
  images (chance 1/values).
* ``attr_errors``: on novel images, whether a wrong probe answer names the value of a seen class (the
  nearest by parts, or the one the global embedding reads the image as) more often than chance would
  (``wrong_value_shares``); ``world``: how often the seen classes nearest to a novel class share its value
  of each factor (``nearest_value_shares``, no model).
* ``open50``: novel images classified among all 50 classes (40 seen + 10 novel) with name-free
  caption-style prompts: the share that lands on a *seen* class shows a global embedding that codes
  seen combinations rather than parts.
* ``confusion``: the global embedding's novel predictions per true class (evaluator prompts).
* ``attention``: the last layer's attention over the ViT patch tokens, of GRAIN's global query, its
  region queries and CLIP's CLS token: effective number of tokens attended (exp of the entropy, of 64)
  and the share of attention mass on patches that hold object pixels.
"""
from __future__ import annotations

import argparse
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grain_jax import inference
from grain_jax.data import synthetic, tokenizer, transforms
from grain_jax.inference import prompts
from grain_jax.losses.contrastive import l2_normalize
from grain_jax.models import layers

# factor -> (values, caption-style text, descriptor-style text); the part is probed by its kind only.
PROBES = {
    "shape": (synthetic.SHAPES, "a {} object", "a {} body"),
    "colour": (synthetic.COLOUR_NAMES, "a {} object", "a {} body"),
    "pattern": (synthetic.PATTERNS, "a {} object", "has a {} body"),
    "part_kind": (synthetic.PART_KINDS, "an object with a {}", "a {} on top"),
    "base": (synthetic.BASES[1:], "an object {}", "has {}"),
}
_BASE_WORDS = {"legs": ("on two thin legs", "two thin legs"), "wheels": ("on two wheels", "two wheels"),
               "stand": ("on a flat stand", "a flat stand")}


def probe_texts(factor: str, style: str) -> list[str]:
    """The single-attribute texts of one factor's values; style "caption" or "descriptor"."""
    values, caption, descriptor = PROBES[factor]
    if factor == "base":
        return [(caption if style == "caption" else descriptor).format(_BASE_WORDS[v][style != "caption"])
                for v in values]
    return [(caption if style == "caption" else descriptor).format(v) for v in values]


def trained_tokens(seed: int, resolution: int, scenes: int = 2000) -> set[int]:
    """BPE ids of the training texts (captions, MLLM captions, region descriptions) of the first scenes."""
    tok = tokenizer.default_tokenizer()
    ids: set[int] = set()
    for scene in synthetic.generate_scenes("train", 0, scenes, resolution=resolution, seed=seed):
        for text in (scene.caption, scene.mllm_caption, *(r["description"] for r in scene.regions)):
            ids.update(tok.encode(text))
    return ids


def draw_names(count: int, exclude: set[str], draw: int, trained: set[int] | None = None) -> list[str]:
    """`count` made-up names (the benchmark's generator, another stream) not in `exclude`; with `trained`,
    only names none of whose BPE tokens is in it."""
    tok = tokenizer.default_tokenizer()
    rng = np.random.default_rng([draw, 0x4E4D])
    names: list[str] = []
    while len(names) < count:
        name = synthetic._made_up_names(rng, 1)[0]
        if name in exclude or name in names or (trained is not None and set(tok.encode(name)) & trained):
            continue
        names.append(name)
    return names


def attention_maps(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Last-layer attention probabilities over the ViT tokens (CLS first, then P patches), mean over heads.

    GRAIN: ``global`` [N, 1+P] (the global query's cross-attention), ``regions`` [N, Q, 1+P] and
    ``global_layer<i>`` (the global query in the earlier decoder layers);
    CLIP: ``global`` [N, 1+P] (the CLS token's self-attention row)."""
    records = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, layers.MultiHeadAttention) and context.method_name == "__call__":
            q_in, k_in = args[0], (args[1] if len(args) > 1 else args[0])
            params = module.variables["params"]
            kernel, bias = params["qkv_kernel"].astype(jnp.float32), params["qkv_bias"].astype(jnp.float32)
            q = jnp.einsum("...lw,whd->...lhd", q_in.astype(jnp.float32), kernel[:, 0]) + bias[0]
            k = jnp.einsum("...lw,whd->...lhd", k_in.astype(jnp.float32), kernel[:, 1]) + bias[1]
            logits = jnp.einsum("...qhd,...khd->...hqk", q, k) * q.shape[-1] ** -0.5
            records["/".join(module.path)] = np.asarray(jax.nn.softmax(logits, -1).mean(-3))
        return next_fun(*args, **kwargs)

    pixels = transforms.normalize(jnp.asarray(images), model.spec.mean, model.spec.std)
    with nn.intercept_methods(record):
        model.model.apply({"params": model.params}, pixels, method="encode_image")
    if model.has_grounding:
        cross = sorted(k for k in records if "cross_attn" in k)
        maps = {"global": records[cross[-1]][:, -1], "regions": records[cross[-1]][:, :-1]}  # [N, (Q,) 1+P]
        maps.update({f"global_layer{i}": records[k][:, -1] for i, k in enumerate(cross[:-1])})
        return maps
    blocks = sorted((k for k in records if k.startswith("image")), key=lambda k: int(k.split("blocks_")[1].split("/")[0]))
    return {"global": records[blocks[-1]][:, 0]}


def object_patches(labels: np.ndarray, patch: int) -> np.ndarray:
    """labels [N, 1, R, R] (one object per scene) -> bool [N, P]: patches holding any object pixel."""
    n, _, r, _ = labels.shape
    grid = (labels[:, 0] > 0).reshape(n, r // patch, patch, r // patch, patch)
    return grid.any((2, 4)).reshape(n, -1)


def attention_summary(maps: dict[str, np.ndarray], on_object: np.ndarray) -> dict[str, float]:
    """maps: {name: [N, (Q,) 1+P]} (CLS first), on_object [N, P] -> effective number of tokens (exp of the
    entropy) and the attention mass on the CLS token and on object patches, means over images (and queries)."""
    out = {}
    for key, probs in maps.items():
        entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(-1)
        mask = on_object if probs.ndim == 2 else on_object[:, None]
        out[f"{key}/effective_tokens"] = float(np.exp(entropy).mean())
        out[f"{key}/cls_mass"] = float(probs[..., 0].mean())
        out[f"{key}/object_mass"] = float((probs[..., 1:] * mask).sum(-1).mean())
    out["object_patch_share"] = float(on_object.mean())
    return out


def probe_value(concept: synthetic.ConceptClass, factor: str) -> int:
    """The index of a class's value among the probe's values (``PROBES``); -1 for "no base"."""
    return getattr(concept, factor) - (factor == "base")


def nearest_seen(cat: synthetic.Catalogue, concept: synthetic.ConceptClass,
                 ignore: str | None = None) -> list[synthetic.ConceptClass]:
    """The seen classes with the fewest part values differing from ``concept``'s (all but ``ignore``)."""
    columns = [i for i, (factor, _) in enumerate(synthetic.FACTORS) if factor != ignore]
    seen = np.array([c.attributes for c in cat.seen])[:, columns]
    distance = (seen != np.array(concept.attributes)[columns]).sum(1)
    return [cat.seen[i] for i in np.flatnonzero(distance == distance.min())]


def nearest_value_shares(cat: synthetic.Catalogue) -> dict[str, dict[str, float]]:
    """Per factor, mean over novel classes: ``nearest_others``, the share of the seen classes nearest in the
    other parts that have the novel class's value (the accuracy of answering "like the nearest seen class"),
    and ``any_seen``, the share of all seen classes that have it (a property of the world, no model)."""
    out = {}
    for factor, _ in synthetic.FACTORS:
        same = [np.mean([getattr(s, factor) == getattr(c, factor) for s in nearest_seen(cat, c, ignore=factor)])
                for c in cat.novel]
        anyone = [np.mean([getattr(s, factor) == getattr(c, factor) for s in cat.seen]) for c in cat.novel]
        out[factor] = {"nearest_others": float(np.mean(same)), "any_seen": float(np.mean(anyone))}
    return out


def wrong_value_shares(cat: synthetic.Catalogue, concepts, assigned, factor: str, pred: np.ndarray) -> dict:
    """Does a wrong probe answer on a novel image name a seen class's value rather than a random one?

    concepts: [N] the images' novel classes; assigned: [N] the seen class each image is read as;
    pred: [N] the probe's predicted value indices. For each source of values (the seen classes nearest
    to the image's class over all parts, ``nearest``, or over the other parts, ``nearest_others``, and
    ``assigned``): among the wrong answers, the share naming one of the source's values (other than the
    true one), and ``<source>_chance``, the share that uniformly random wrong answers would give.
    """
    count = len(PROBES[factor][0])
    true = np.array([probe_value(c, factor) for c in concepts])
    wrong = (pred != true) & (true >= 0)
    out = {"wrong": float(wrong[true >= 0].mean()), "wrong_count": int(wrong.sum())}
    sources = {"nearest": lambda i: nearest_seen(cat, concepts[i]),
               "nearest_others": lambda i: nearest_seen(cat, concepts[i], ignore=factor),
               "assigned": lambda i: [assigned[i]]}
    for name, source in sources.items():
        hits, chance = [], []
        for i in np.flatnonzero(wrong):
            values = {probe_value(c, factor) for c in source(i)} - {true[i], -1}
            hits.append(pred[i] in values)
            chance.append(len(values) / (count - 1))
        out[name] = float(np.mean(hits)) if hits else float("nan")
        out[f"{name}_chance"] = float(np.mean(chance)) if chance else float("nan")
    return out


def caption_style(concept: synthetic.ConceptClass) -> str:
    """Every part value of a class in one name-free phrase, as the MLLM captions word a look."""
    return synthetic.look_phrase(concept, prompts.NEUTRAL_NAME)


def diagnose(model, per_class: int, seed: int = 0, resolution: int = 64, attention_images: int = 100,
             name_draws: int = 8) -> dict:
    cat = synthetic.catalogue(seed)
    result: dict = {}
    scenes = {split: synthetic.generate_scenes(split, 0, per_class * len(cat.classes(split)), resolution=resolution,
                                               seed=seed, with_labels=True) for split in ("seen", "novel")}
    images = {s: np.stack([x.image for x in v]) for s, v in scenes.items()}
    truth = {s: np.array([cat.class_names(s).index(x.objects[0].concept.name) for x in v]) for s, v in scenes.items()}
    outputs = {s: model._image_outputs(images[s]) for s in images}
    templates = prompts.get_templates("short")

    seen, novel = cat.classes("seen"), cat.classes("novel")
    names = [c.name for c in novel]
    descs = [c.descriptors for c in novel]
    def class_embeddings(class_names: list[str], **kwargs) -> np.ndarray:  # [10, D], the evaluator's recipe
        return model.classifier(class_names, dict(zip(class_names, descs)), templates, **kwargs).embeddings

    variants = {"evaluator": class_embeddings(names),
                "noname": class_embeddings(names, name_free=True),
                "name_only": model.classifier(names, templates=templates).embeddings,
                "caption_style": model.encode_texts([caption_style(c) for c in novel])}
    img = outputs["novel"]["image_embedding"]
    result["top1"] = {k: float((np.argmax(img @ e.T, 1) == truth["novel"]).mean()) for k, e in variants.items()}
    if model.has_grounding:
        clf = model.classifier(names, descriptors=dict(zip(names, descs)), templates=templates)
        _, region = model.score_parts(images["novel"], clf)
        result["top1"]["regions_alpha0"] = float((region.argmax(1) == truth["novel"]).mean())

    # Other made-up names for the same novel classes: how much the top-1 depends on the name draw, and
    # names made only of BPE tokens that no training text contains (their token embeddings never trained).
    trained = trained_tokens(seed, resolution)
    for kind in ("redrawn", "untrained_tokens"):
        accuracies = []
        for draw in range(name_draws):
            other = draw_names(len(names), {c.name for c in seen} | set(names), draw, trained if kind != "redrawn" else None)
            e = class_embeddings(other)
            accuracies.append(float((np.argmax(img @ e.T, 1) == truth["novel"]).mean()))
        result["top1"][f"{kind}_names_mean"] = float(np.mean(accuracies))
        result["top1"][f"{kind}_names_std"] = float(np.std(accuracies, ddof=1))

    def mean_offdiag(e):
        e = np.asarray(l2_normalize(e))
        sims = e @ e.T
        return float(sims[~np.eye(len(e), dtype=bool)].mean())

    result["text_cos"] = {"novel": mean_offdiag(variants["evaluator"]),
                          "novel_noname": mean_offdiag(variants["noname"]),
                          "seen": mean_offdiag(model.classifier([c.name for c in seen], cat.descriptors("seen"),
                                                                templates).embeddings),
                          "name_vs_noname_same_class": float(np.mean(np.sum(
                              np.asarray(l2_normalize(variants["evaluator"])) *
                              np.asarray(l2_normalize(variants["noname"])), -1)))}

    result["attr"], result["attr_errors"], result["world"] = {}, {}, nearest_value_shares(cat)
    seen_clf = model.classifier([c.name for c in seen], cat.descriptors("seen"), templates)
    assigned = [seen[i] for i in np.argmax(img @ seen_clf.embeddings.T, 1)]  # the seen class each novel image is read as
    for split in ("seen", "novel"):
        concepts = [cat.classes(split)[t] for t in truth[split]]
        for factor in PROBES:
            true = np.array([probe_value(c, factor) for c in concepts])
            keep = true >= 0  # the base probe skips objects without a base
            for style in ("caption", "descriptor"):
                texts = model.encode_texts(probe_texts(factor, style))
                out = outputs[split]
                key = f"{split}/{factor}/{style}"
                preds = {"global": (out["image_embedding"] @ texts.T).argmax(1)}
                if "region_embeddings" in out:
                    preds["regions"] = np.einsum("nqd,vd->nqv", out["region_embeddings"], texts).max(1).argmax(1)
                for where, pred in preds.items():
                    result["attr"][f"{key}/{where}"] = float((pred == true)[keep].mean())
                    if split == "novel":
                        result["attr_errors"].update({f"{key}/{where}/{k}": v for k, v in wrong_value_shares(
                            cat, concepts, assigned, factor, pred).items()})
    for split in ("seen", "novel"):
        for where in ("global", "regions"):
            values = [v for k, v in result["attr"].items() if k.startswith(split + "/") and k.endswith("/" + where)]
            if values:
                result["attr"][f"{split}/mean/{where}"] = float(np.mean(values))

    everything = list(seen) + list(novel)
    open_texts = model.encode_texts([caption_style(c) for c in everything])
    pred = np.argmax(img @ open_texts.T, 1)
    result["open50"] = {"novel_correct": float((pred == len(seen) + truth["novel"]).mean()),
                        "novel_to_seen": float((pred < len(seen)).mean())}
    seen_pred = np.argmax(outputs["seen"]["image_embedding"] @ open_texts.T, 1)
    result["open50"]["seen_correct"] = float((seen_pred == truth["seen"]).mean())

    pred = np.argmax(img @ variants["evaluator"].T, 1)
    result["confusion"] = {names[t]: {names[p]: int(((truth["novel"] == t) & (pred == p)).sum())
                                      for p in range(len(names)) if ((truth["novel"] == t) & (pred == p)).any()}
                           for t in range(len(names))}

    pick = np.linspace(0, len(scenes["novel"]) - 1, min(attention_images, len(scenes["novel"]))).astype(int)
    labels = np.stack([scenes["novel"][i].labels for i in pick])
    maps = attention_maps(model, images["novel"][pick])
    patch = resolution // int(round((maps["global"].shape[-1] - 1) ** 0.5))
    result["attention"] = attention_summary(maps, object_patches(labels, patch))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", required=True, help="comma-separated training workdirs")
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the synthetic world's seed")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    results = {}
    for path in args.checkpoints.split(","):
        model = inference.load(path)
        results[path] = diagnose(model, args.per_class, args.seed, model.spec.image_size)
        print(path, json.dumps(results[path]), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
