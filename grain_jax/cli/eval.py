r"""grain-jax-eval: zero-shot classification and retrieval of one or more checkpoints.

examples:
  grain-jax-eval --checkpoint workdir/grain --checkpoint workdir/clip \
      --evals synthetic --synthetic_dir /data/synthetic --output results.json
  grain-jax-eval --checkpoint ckpt --evals all --data_dir ~/tensorflow_datasets \
      --descriptors classify_by_description_release/descriptors --output results.json
  grain-jax-eval --compare results_grain.json,results_clip.json --output both.json

Writes the results JSON (per-dataset metrics, checkpoint, model spec, flags, timings,
images/s), prints a Markdown table and saves a bar chart of per-dataset top-1
(``<output>.png``; one bar per checkpoint when several are given or compared).
Datasets missing under ``--data_dir`` are reported in one line each and skipped; when none is
prepared the binary stops (exit 1) with how to prepare them.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags

from grain_jax import cli
from grain_jax.cli import console
from grain_jax.evaluators import suite, zeroshot

PROGRAM = "grain-jax-eval"
_PATHS = {"checkpoint": "checkpoint", "compare": "file", "descriptors": "path", "image_dir": "directory"}


def _flags() -> flags.FlagValues:
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
    flags.DEFINE_list("synthetic_alphas", [str(a) for a in zeroshot.LOCAL_ALPHAS], "Alphas for the synthetic / "
                      "folder benchmarks (0: the regions alone).", flag_values=fv)
    flags.DEFINE_bool("name_free", None, "Also report top-1 etc. with the class names replaced by 'object' in "
                      "the prompts (name_free/ keys); default: for the synthetic benchmark only (made-up names), "
                      "--name_free adds folder: and TFDS datasets, --noname_free turns it off.", flag_values=fv)
    flags.DEFINE_bool("renormalize", False, "Re-normalise the class mean embeddings (the reference does not).",
                      flag_values=fv)
    flags.DEFINE_integer("num_threads", 8, "Image decoding threads.", flag_values=fv)
    flags.DEFINE_list("compare", [], "Comma list of earlier results JSONs to include in the table and chart.",
                      flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> None:
    """Runs the binary on ``argv`` (program name first)."""
    fv = _flags()
    cli.parse(argv, fv, __doc__, paths=_PATHS)
    checkpoints = [c.strip() for item in fv.checkpoint for c in item.split(",") if c.strip()]
    if not checkpoints and not fv.compare:
        raise console.UsageError("give --checkpoint (one or more) and/or --compare results JSONs (see --help)")
    runs = []
    for path in fv.compare:
        with open(path) as f:
            runs += json.load(f)["runs"]
    import jax
    from grain_jax import sharding
    mesh = sharding.create_mesh((-1, 1, 1)) if jax.device_count() > 1 else None
    config = {k: fv[k].value for k in ("evals", "data_dir", "templates", "descriptors", "synthetic_dir",
                                       "batch_size", "max_examples", "alphas", "synthetic_alphas", "renormalize",
                                       "name_free")}
    resolved = suite.resolve_datasets(fv.evals, data_dir=fv.data_dir, descriptors=fv.descriptors,
                                      synthetic_dir=fv.synthetic_dir, image_dir=fv.image_dir) if checkpoints else None
    if resolved and not resolved[0]:
        raise console.Failure(suite.nothing_prepared(resolved[1], fv.data_dir))
    for checkpoint in checkpoints:
        print(f"evaluating {checkpoint} on {fv.evals}", flush=True)
        run = suite.evaluate_checkpoint(
            checkpoint, fv.evals, resolved=resolved, templates=fv.templates, batch_size=fv.batch_size,
            max_examples=fv.max_examples, alphas=[float(a) for a in fv.alphas],
            synthetic_alphas=[float(a) for a in fv.synthetic_alphas], renormalize=fv.renormalize,
            name_free=fv.name_free, num_threads=fv.num_threads, mesh=mesh)
        run["config"] = config
        runs.append(run)
    os.makedirs(os.path.dirname(os.path.abspath(fv.output)), exist_ok=True)
    with open(fv.output, "w") as f:
        json.dump({"runs": runs}, f, indent=2)
    chart = os.path.splitext(fv.output)[0] + ".png"
    suite.bar_chart(runs, chart)
    print(suite.markdown_table(runs))
    print(f"results: {fv.output}  chart: {chart}")


def run(argv: Sequence[str] | None = None) -> None:
    """Console script ``grain-jax-eval``."""
    cli.run(PROGRAM, main, argv)


if __name__ == "__main__":
    run()
