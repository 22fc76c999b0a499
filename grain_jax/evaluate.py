"""grain-jax-eval: zero-shot classification and retrieval of one or more checkpoints.

    grain-jax-eval --checkpoint workdir/grain --checkpoint workdir/clip \
        --evals synthetic --synthetic_dir /data/synthetic --output results.json
    grain-jax-eval --checkpoint ckpt --evals all --data_dir ~/tensorflow_datasets \
        --descriptors classify_by_description_release/descriptors --output results.json
    grain-jax-eval --compare results_grain.json,results_clip.json --output both.json

Writes the results JSON (per-dataset metrics, checkpoint, model spec, flags, timings,
images/s), prints a Markdown table and saves a bar chart of per-dataset top-1
(``<output>.png``; one bar per checkpoint when several are given or compared).
Datasets missing under ``--data_dir`` are reported in one line each and skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

from absl import flags

from grain_jax.evaluators import datasets as datasets_lib
from grain_jax.evaluators import retrieval, zeroshot

def define_flags() -> flags.FlagValues:
    """The binary's flags, in their own FlagValues (importing this module defines none)."""
    fv = flags.FlagValues()
    flags.DEFINE_multi_string("checkpoint", [], "Checkpoint dir or random:<model name>; repeat or comma-separate "
                              "to compare several.", flag_values=fv)
    flags.DEFINE_string("evals", "all", "Comma list: TFDS names (imagenet2012, cifar10, ...), all (the 12 of "
                        "the paper), synthetic (seen+novel), synthetic:novel, folder:PATH, coco_captions, "
                        "captions:FILE.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir.", flag_values=fv)
    flags.DEFINE_string("output", "results.json", "Results JSON; the chart goes next to it as .png.", flag_values=fv)
    flags.DEFINE_string("templates", "ref46", "Template set: ref46 (reference, parity), clip80, short, "
                        "per_dataset.", flag_values=fv)
    flags.DEFINE_string("descriptors", None, "A descriptor JSON (one dataset) or a directory of "
                        "descriptors_<dataset>.json.", flag_values=fv)
    flags.DEFINE_string("synthetic_dir", None, "Directory of the synthetic benchmark (generated there if "
                        "absent).", flag_values=fv)
    flags.DEFINE_string("image_dir", None, "Image folder for captions:FILE retrieval (default: the file's "
                        "folder).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Images per device step.", flag_values=fv)
    flags.DEFINE_integer("max_examples", None, "Evaluate a fixed random subset of each dataset (quick looks).",
                         flag_values=fv)
    flags.DEFINE_list("alphas", ["1.0"], "Score mixes alpha*global + (1-alpha)*region to report (GRAIN with "
                      "descriptors).", flag_values=fv)
    flags.DEFINE_list("synthetic_alphas", ["1.0", "0.5"], "Alphas for the synthetic / folder benchmarks.",
                      flag_values=fv)
    flags.DEFINE_bool("renormalize", False, "Re-normalise the class mean embeddings (the reference does not).",
                      flag_values=fv)
    flags.DEFINE_integer("num_threads", 8, "Image decoding threads.", flag_values=fv)
    flags.DEFINE_string("compare", None, "Comma list of earlier results JSONs to include in the table and chart.",
                        flag_values=fv)
    return fv


def parse_argv(fv: flags.FlagValues, argv: Sequence[str]) -> flags.FlagValues:
    """Parses ``argv`` (program name first) into ``fv``; --help prints the flags and exits."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        sys.exit(0)
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        sys.exit(f"{argv[0]}: {e}\nrun with --help for the flags")
    if len(rest) > 1:
        sys.exit(f"{argv[0]}: unexpected arguments {rest[1:]}")
    return fv


def checkpoint_label(checkpoint: str) -> str:
    return checkpoint if checkpoint.startswith("random:") else os.path.basename(os.path.normpath(checkpoint))


def is_retrieval(spec: str) -> bool:
    return spec == "coco_captions" or spec.startswith("captions:")


def resolve_datasets(evals: Sequence[str] | str, *, data_dir: str | None = None, descriptors: str | None = None,
                     synthetic_dir: str | None = None, image_dir: str | None = None) -> tuple[dict, list[str]]:
    """Opens every dataset before anything is evaluated, so a bad descriptor file fails in seconds,
    not after hours; unprepared TFDS datasets are reported (one line each) and left out.

    Returns:
      ({spec: ClassificationData | RetrievalData}, [specs not prepared]).
    """
    resolved, not_prepared = {}, []
    for spec in datasets_lib.expand(evals):
        try:
            if is_retrieval(spec):
                resolved[spec] = retrieval.retrieval_dataset(spec, data_dir=data_dir, image_dir=image_dir)
            else:
                resolved[spec] = datasets_lib.classification_dataset(
                    spec, data_dir=data_dir, descriptors=descriptors, synthetic_dir=synthetic_dir)
        except datasets_lib.NotPrepared as e:
            print(str(e).split("  (")[0], flush=True)
            not_prepared.append(spec)
    return resolved, not_prepared


def evaluate_checkpoint(checkpoint: str, evals: Sequence[str] | str, *, data_dir: str | None = None,
                        templates: str = "ref46", descriptors: str | None = None, synthetic_dir: str | None = None,
                        image_dir: str | None = None, batch_size: int = 64, max_examples: int | None = None,
                        alphas: Sequence[float] = (1.0,), synthetic_alphas: Sequence[float] = (1.0, 0.5),
                        renormalize: bool = False, num_threads: int = 8, progress: bool = True,
                        mesh=None, resolved: tuple[dict, list[str]] | None = None) -> dict:
    """Evaluates one checkpoint; returns its run record (what the results JSON lists).

    ``resolved``: the output of ``resolve_datasets`` (to share it between checkpoints).
    """
    from grain_jax import inference

    start = time.perf_counter()
    datasets, not_prepared = resolved or resolve_datasets(evals, data_dir=data_dir, descriptors=descriptors,
                                                          synthetic_dir=synthetic_dir, image_dir=image_dir)
    model = inference.load(checkpoint, mesh=mesh, batch_size=batch_size)
    run = {"checkpoint": checkpoint, "label": checkpoint_label(checkpoint), "model": dataclasses.asdict(model.spec),
           "mode": model.mode, "results": {}, "not_prepared": list(not_prepared)}
    for spec, data in datasets.items():
        if is_retrieval(spec):
            metrics = retrieval.evaluate(model, data, max_images=max_examples, num_threads=num_threads,
                                         progress=progress)
            metrics["type"] = "retrieval"
        else:
            local = spec.startswith(("synthetic:", "folder:"))
            metrics = zeroshot.evaluate(model, data, templates=templates, renormalize=renormalize,
                                        alphas=synthetic_alphas if local else alphas, max_examples=max_examples,
                                        num_threads=num_threads, progress=progress)
            metrics["type"] = "zeroshot"
        run["results"][data.name] = metrics
    zeroshot_results = {k: v for k, v in run["results"].items() if v["type"] == "zeroshot"}
    run["averages"] = zeroshot.averages(zeroshot_results)
    run["seconds"] = time.perf_counter() - start
    return run


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def markdown_table(runs: Sequence[dict]) -> str:
    """One row per dataset metric, one column per checkpoint (values in %)."""
    rows: list[tuple[str, str, str]] = []  # (row label, results key, metric)
    for run in runs:
        for name, metrics in run["results"].items():
            keys = ([k for k in metrics if "R@" in k] if metrics["type"] == "retrieval" else
                    [k for k in metrics if k.split("/")[-1] in ("top1", "top5")])
            for key in keys:
                row = (f"{name} {key}", name, key)
                if row not in rows:
                    rows.append(row)
        for key in (k for k in run.get("averages", {}) if k.split("/")[-1] in ("top1", "top5")):
            row = (key, None, key)
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
    """Grouped bars of per-dataset zero-shot top-1 (one colour per checkpoint)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = []
    for run in runs:
        names += [n for n, m in run["results"].items() if m["type"] == "zeroshot" and n not in names]
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) * max(1, len(runs)) + 1.5), 4))
    x = np.arange(len(names))
    for i, run in enumerate(runs):
        values = [100 * run["results"].get(n, {}).get("top1", float("nan")) for n in names]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=run["label"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str]) -> None:
    """Runs the binary on ``argv`` (program name first)."""
    fv = parse_argv(define_flags(), argv)
    checkpoints = [c.strip() for item in fv.checkpoint for c in item.split(",") if c.strip()]
    runs = []
    for path in (fv.compare.split(",") if fv.compare else []):
        with open(path) as f:
            runs += json.load(f)["runs"]
    if not checkpoints and not runs:
        sys.exit("give --checkpoint (one or more) and/or --compare results JSONs")
    import jax
    from grain_jax import sharding
    mesh = sharding.create_mesh((-1, 1, 1)) if jax.device_count() > 1 else None
    config = {k: fv[k].value for k in ("evals", "data_dir", "templates", "descriptors", "synthetic_dir",
                                       "batch_size", "max_examples", "alphas", "synthetic_alphas", "renormalize")}
    resolved = resolve_datasets(fv.evals, data_dir=fv.data_dir, descriptors=fv.descriptors,
                                synthetic_dir=fv.synthetic_dir, image_dir=fv.image_dir) if checkpoints else None
    for checkpoint in checkpoints:
        print(f"evaluating {checkpoint} on {fv.evals}", flush=True)
        run = evaluate_checkpoint(
            checkpoint, fv.evals, resolved=resolved, templates=fv.templates, batch_size=fv.batch_size,
            max_examples=fv.max_examples, alphas=[float(a) for a in fv.alphas],
            synthetic_alphas=[float(a) for a in fv.synthetic_alphas], renormalize=fv.renormalize,
            num_threads=fv.num_threads, mesh=mesh)
        run["config"] = config
        runs.append(run)
    os.makedirs(os.path.dirname(os.path.abspath(fv.output)), exist_ok=True)
    with open(fv.output, "w") as f:
        json.dump({"runs": runs}, f, indent=2)
    chart = os.path.splitext(fv.output)[0] + ".png"
    bar_chart(runs, chart)
    print(markdown_table(runs))
    print(f"results: {fv.output}  chart: {chart}")


def run() -> None:
    """Console-script entry point (``grain-jax-eval``)."""
    main(sys.argv)


if __name__ == "__main__":
    run()
