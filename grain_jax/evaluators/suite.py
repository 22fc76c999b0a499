"""What ``grain-jax-eval`` runs: evaluate checkpoints on a list of datasets, tabulate and chart the results.

A run record (one per checkpoint) is ``{checkpoint, label, model, mode, results: {dataset: metrics},
not_prepared, averages, seconds}``; the results JSON is ``{"runs": [record, ...]}``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

from grain_jax import checkpoints, inference
from grain_jax.evaluators import datasets as datasets_lib
from grain_jax.evaluators import retrieval, zeroshot


def checkpoint_step(checkpoint: str) -> int | None:
    """The step ``inference.load`` restores from ``checkpoint`` (its latest); None for ``random:<model>``."""
    if checkpoint.startswith("random:") or not os.path.isdir(os.path.join(checkpoint, checkpoints.CHECKPOINTS)):
        return None
    with checkpoints.manager(checkpoint, read_only=True) as mngr:
        return mngr.latest_step()


def checkpoint_label(checkpoint: str, model_name: str | None = None, step: int | None = None) -> str:
    """A results column's name: ``grain-tiny demo@300`` (model, workdir name, step)."""
    if checkpoint.startswith("random:"):
        return checkpoint
    name = os.path.basename(os.path.normpath(checkpoint))
    return " ".join(filter(None, (model_name, name + ("" if step is None else f"@{step}"))))


def is_retrieval(spec: str) -> bool:
    return spec == "coco_captions" or spec.startswith("captions:")


def resolve_datasets(evals: Sequence[str] | str, *, data_dir: str | None = None, descriptors: str | None = None,
                     synthetic_dir: str | None = None, image_dir: str | None = None) -> tuple[dict, list[str]]:
    """Opens every dataset before anything is evaluated, so a bad descriptor file fails in seconds,
    not after hours; unprepared TFDS datasets are reported (one line each) and left out.

    Returns:
      ({spec: ClassificationData | RetrievalData}, [specs not prepared]).
    """
    resolved, not_prepared, names = {}, [], {}
    for spec in datasets_lib.expand(evals):
        try:
            if is_retrieval(spec):
                resolved[spec] = retrieval.retrieval_dataset(spec, data_dir=data_dir, image_dir=image_dir)
            else:
                resolved[spec] = datasets_lib.classification_dataset(
                    spec, data_dir=data_dir, descriptors=descriptors, synthetic_dir=synthetic_dir)
            datasets_lib.give_unique_name(resolved[spec], spec, names)
        except datasets_lib.NotPrepared as e:
            print(str(e).split("  (")[0], flush=True)
            not_prepared.append(spec)
    return resolved, not_prepared


def nothing_prepared(not_prepared: Sequence[str], data_dir: str | None) -> str:
    """The one line for a run whose datasets are all unprepared (the binary then exits 1)."""
    where = datasets_lib.default_data_dir(data_dir)
    return (f"nothing to evaluate: none of {', '.join(not_prepared)} is prepared under {where}. Building TFDS "
            "datasets needs TensorFlow (pip install tensorflow, then tfds build NAME --file_format=array_record "
            "--data_dir DIR); without it, evaluate an image folder (--evals folder:PATH, PATH/<class>/*.jpg) "
            "or the embedded benchmark (--evals synthetic --synthetic_dir DIR)")


def evaluate_checkpoint(checkpoint: str, evals: Sequence[str] | str, *, data_dir: str | None = None,
                        templates: str = "ref46", descriptors: str | None = None, synthetic_dir: str | None = None,
                        image_dir: str | None = None, batch_size: int = 64, max_examples: int | None = None,
                        alphas: Sequence[float] = (1.0,), synthetic_alphas: Sequence[float] = zeroshot.LOCAL_ALPHAS,
                        renormalize: bool = False, name_free: bool | None = None, num_threads: int = 8,
                        progress: bool = True, mesh=None, resolved: tuple[dict, list[str]] | None = None) -> dict:
    """Evaluates one checkpoint; returns its run record (what the results JSON lists).

    ``resolved``: the output of ``resolve_datasets`` (to share it between checkpoints); ``name_free``: as in
    ``zeroshot.evaluate`` (None: the synthetic benchmark only).
    """
    start = time.perf_counter()
    datasets, not_prepared = resolved or resolve_datasets(evals, data_dir=data_dir, descriptors=descriptors,
                                                          synthetic_dir=synthetic_dir, image_dir=image_dir)
    step = checkpoint_step(checkpoint)
    model = inference.load(checkpoint, mesh=mesh, batch_size=batch_size, step=step)
    run = {"checkpoint": checkpoint, "step": step, "label": checkpoint_label(checkpoint, model.spec.model_name, step),
           "model": dataclasses.asdict(model.spec), "mode": model.mode, "results": {},
           "not_prepared": list(not_prepared)}
    for spec, data in datasets.items():
        if is_retrieval(spec):
            metrics = retrieval.evaluate(model, data, max_images=max_examples, num_threads=num_threads,
                                         progress=progress)
            metrics["type"] = "retrieval"
        else:
            local = spec.startswith(("synthetic:", "folder:"))
            metrics = zeroshot.evaluate(model, data, templates=templates, renormalize=renormalize,
                                        alphas=synthetic_alphas if local else alphas, name_free=name_free,
                                        max_examples=max_examples, num_threads=num_threads, progress=progress)
            metrics["type"] = "zeroshot"
        run["results"][data.name] = metrics
    zeroshot_results = {k: v for k, v in run["results"].items() if v["type"] == "zeroshot"}
    run["averages"] = zeroshot.averages(zeroshot_results)
    run["seconds"] = time.perf_counter() - start
    return run


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def metric_label(key: str) -> str:
    """``alpha0.5/top1`` -> ``top1, α=0.5`` (α = 1, the global embedding alone, is left unsaid);
    ``name_free/alpha0.5/top1`` -> ``top1, names → object, α=0.5``."""
    name_free = key.startswith(zeroshot.NAME_FREE)
    head, _, metric = key.removeprefix(zeroshot.NAME_FREE).rpartition("/")
    if head and not head.startswith("alpha"):
        return key
    return ", ".join([metric] + ["names → object"] * name_free + [f"α={head[len('alpha'):]}"] * bool(head))


def _top1_series(runs: Sequence[dict]) -> list[tuple[int, str]]:
    """(run index, results key) of every top-1 bar: each run's α = 1 and its region mixes, in α order."""
    series = []
    for index, run in enumerate(runs):
        keys = {k for m in run["results"].values() if m["type"] == "zeroshot" for k in m
                if k == "top1" or (k.startswith("alpha") and k.endswith("/top1"))}
        series += [(index, k) for k in sorted(keys, key=lambda k: (k != "top1", -float(k[5:-5] or 1)))]
    return series


def markdown_table(runs: Sequence[dict]) -> str:
    """One row per dataset metric, one column per checkpoint (values in %)."""
    rows: list[tuple[str, str, str]] = []  # (row label, results key, metric)
    for run in runs:
        for name, metrics in run["results"].items():
            keys = ([k for k in metrics if "R@" in k] if metrics["type"] == "retrieval" else
                    [k for k in metrics if k.split("/")[-1] in ("top1", "top5")])
            for key in keys:
                row = (f"{name} {metric_label(key)}", name, key)
                if row not in rows:
                    rows.append(row)
        for key in (k for k in run.get("averages", {}) if k.split("/")[-1] in ("top1", "top5")):
            row = (metric_label(key), None, key)
            if row not in rows:
                rows.append(row)
    header = "| dataset / metric (%) | " + " | ".join(r["label"] for r in runs) + " |"
    lines = [header, "|" + "---|" * (len(runs) + 1)]
    for label, name, key in rows:
        cells = [_percent(r["results"].get(name, {}).get(key) if name else r.get("averages", {}).get(key))
                 for r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(runs: Sequence[dict], path: str) -> None:
    """Grouped bars of per-dataset zero-shot top-1: one bar per checkpoint and score mix (α = 1: the global
    embedding; α < 1 mixes in the region scores of a GRAIN model with descriptors; α = 0: regions alone)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = []
    for run in runs:
        names += [n for n, m in run["results"].items() if m["type"] == "zeroshot" and n not in names]
    series = _top1_series(runs)
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(names) * max(1, len(series)) + 3.5), 4))
    x = np.arange(len(names))
    for i, (index, key) in enumerate(series):
        run = runs[index]
        values = [100 * run["results"].get(n, {}).get(key, float("nan")) for n in names]
        label = run["label"] + ("" if key == "top1" else f", α={key[5:-5]}")
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
