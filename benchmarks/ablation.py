r"""The demo's ablation table: CLIP, GRAIN and GRAIN's ablations on the embedded benchmark, over seeds.

    python benchmarks/ablation.py --workdir workdirs/ablation                      # every run, 3 seeds
    python benchmarks/ablation.py --workdir workdirs/ablation --runs clip,grain --seeds 0
    python benchmarks/ablation.py --workdir workdirs/ablation --readme README.md   # also updates the README

Each run is ``grain-jax-train`` with its config file from ``configs/ablations/`` (``dataset=demo``:
the demo's model, data and schedule; ``--steps`` shortens every run alike) and ``--config.seed=S``.
Seeds change the initialisation, dropout and data order; the synthetic world (classes, images, texts)
is the same for every run (``config.synthetic.seed``). Runs share one generated benchmark, and seeds
of one run share one compilation cache. A run whose ``final_metrics.json`` exists is not repeated, so
an interrupted ablation resumes where it stopped.

Writes into ``--workdir``: ``results.json`` (every run's final metrics), ``ablation.md`` (mean ± std
over seeds of zero-shot top-1 on seen and novel classes, global embedding and alpha = 0.5, novel also with the
class names replaced by "object"), ``ablation.png``
(bars with std error bars) and ``curves.png`` (training L_ic and its in-batch accuracy, mean over seeds).
With ``--readme`` the table and the figures replace the README's ``<!-- ablation:begin/end -->`` block
(figures are copied to ``docs/``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = "configs/ablations"

# name -> (config file argument, what the row changes). The order is the table's.
RUNS = {
    "clip": (f"{ABLATIONS}/clip.py:dataset=demo", "CLIP (CLS token embedding, L_ic only)"),
    "grain": (f"{ABLATIONS}/num_queries.py:dataset=demo,n=5", "GRAIN (5 region queries, global negatives)"),
    "noloc": (f"{ABLATIONS}/noloc.py:dataset=demo", "GRAIN without the box loss"),
    "no_word": (f"{ABLATIONS}/no_word.py:dataset=demo", "GRAIN without L_rd"),
    "queries1": (f"{ABLATIONS}/num_queries.py:dataset=demo,n=1", "GRAIN, 1 region query"),
    "queries3": (f"{ABLATIONS}/num_queries.py:dataset=demo,n=3", "GRAIN, 3 region queries"),
    "queries10": (f"{ABLATIONS}/num_queries.py:dataset=demo,n=10", "GRAIN, 10 region queries"),
    "per_device_negatives": (f"{ABLATIONS}/per_device_negatives.py:dataset=demo,groups=4",
                             "GRAIN, L_rd negatives from 4 sub-batches of 8 (the reference's per-GPU rule)"),
    "names_only_captions": (f"{ABLATIONS}/names_only_captions.py:dataset=demo",
                            "GRAIN, MLLM captions without any part word (strict world)"),
}
STRICT_WORLD = {"names_only_captions": "names_only"}  # runs that train on another generated benchmark
# (column, final_metrics key): zero-shot top-1 of the global embedding, mixed with the region score, of the
# region score alone, and (name_free/) with the class names replaced by "object" in the prompts (runs evaluated
# before the evaluator reported it show "–").
COLUMNS = (("seen", "eval/0shot/synthetic_seen/top1"),
           ("novel", "eval/0shot/synthetic_novel/top1"),
           ("seen α=0.5", "eval/0shot/synthetic_seen/alpha0.5/top1"),
           ("novel α=0.5", "eval/0shot/synthetic_novel/alpha0.5/top1"),
           ("novel α=0 (regions alone)", "eval/0shot/synthetic_novel/alpha0/top1"),
           ("novel, names → object", "eval/0shot/synthetic_novel/name_free/top1"),
           ("novel α=0.5, names → object", "eval/0shot/synthetic_novel/name_free/alpha0.5/top1"))
CURVES = (("loss/image_caption", "L_ic (training)"), ("acc/image_caption", "in-batch image->caption accuracy"))


def run_dir(name: str, seed: int, args) -> str:
    """The run's workdir, absolute: the trainer runs in the repository root, not in the caller's directory."""
    return os.path.join(os.path.abspath(args.workdir), name, f"seed{seed}")


def train_command(name: str, seed: int, args) -> list[str]:
    """The trainer's command line for one (run, seed); every path in it is absolute."""
    root = os.path.abspath(args.workdir)
    config, _ = RUNS[name]
    return [sys.executable, "-m", "grain_jax.cli.train", "--config", os.path.join(ROOT, config),
            "--workdir", run_dir(name, seed, args), f"--config.seed={seed}",
            # One generated benchmark per caption style (a cache dir holds one).
            f"--config.data_cache_dir={os.path.join(root, 'data_' + STRICT_WORLD.get(name, 'holistic'))}",
            f"--config.compilation_cache_dir={os.path.join(root, 'compilation_cache', name)}",
            *([f"--config.total_steps={args.steps}"] if args.steps else []), *args.override]


def run_one(name: str, seed: int, args, cpus: set[int] | None = None) -> dict:
    """Trains and evaluates one (run, seed) unless its final metrics exist; returns them.

    ``cpus``: the cores the run is pinned to (``--jobs`` > 1), else all.
    """
    workdir = run_dir(name, seed, args)
    final = os.path.join(workdir, "final_metrics.json")
    if not os.path.exists(final):
        command = train_command(name, seed, args)
        os.makedirs(workdir, exist_ok=True)
        start = time.time()
        with open(os.path.join(workdir, "ablation.log"), "w") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        if code:
            raise SystemExit(f"{name} seed {seed} failed (exit {code}); see {workdir}/ablation.log")
        print(f"{name} seed {seed}: {time.time() - start:.0f}s", flush=True)
    with open(final) as f:
        return json.load(f)


def curves(name: str, seeds, args) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, mean over seeds)} from the runs' metrics.jsonl."""
    per_seed = []
    for seed in seeds:
        with open(os.path.join(args.workdir, name, f"seed{seed}", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        per_seed.append({r["step"]: r for r in rows if CURVES[0][0] in r})
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    return {key: (np.array(steps), np.array([[s[t][key] for t in steps] for s in per_seed]).mean(0))
            for key, _ in CURVES}


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per run, mean ± std (over seeds) of each column in %."""
    seeds = len(next(iter(results.values())))
    lines = ["| run | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, runs in results.items():
        cells = []
        for _, key in COLUMNS:
            values = [100 * r[key] for r in runs if key in r]
            cells.append(f"{np.mean(values):.1f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.1f}"
                         if values else "–")
        lines.append(f"| {RUNS[name][1]} | " + " | ".join(cells) + " |")
    lines.append(f"\nZero-shot top-1 (%), mean ± std over {seeds} seed(s); chance: seen 2.5, novel 10. "
                 "α mixes the global score with the region score, α·global + (1−α)·region (a CLIP model has no "
                 "region score); \"names → object\": the same prompts with the made-up class name replaced by "
                 "\"object\" (–: not reported by the evaluator that scored the run).")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], seeds, args) -> tuple[str, str]:
    import matplotlib  # noqa: PLC0415  (benchmark-only dependency)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(results)
    columns = [(c, k) for c, k in COLUMNS if any(k in r for runs in results.values() for r in runs)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.8))
    width = 0.8 / len(columns)
    for i, (column, key) in enumerate(columns):
        values = [[100 * r.get(key, np.nan) for r in results[n]] for n in names]
        ax.bar(np.arange(len(names)) + (i - (len(columns) - 1) / 2) * width, [np.mean(v) for v in values], width,
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in values], capsize=2, label=column)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.axhline(10, color="grey", lw=0.8, ls=":")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)  # below: bars stay clear
    ax.set_title(f"Embedded benchmark, mean ± std over {len(seeds)} seed(s)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    bars = os.path.join(args.workdir, "ablation.png")
    fig.savefig(bars, dpi=80)

    fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 3.6))
    for name in names:
        for ax, (key, label) in zip(axes, CURVES):
            steps, values = curves(name, seeds, args)[key]
            ax.plot(steps, values, label=name)
            ax.set_title(label)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    lines = os.path.join(args.workdir, "curves.png")
    fig.savefig(lines, dpi=80)
    return bars, lines


def update_readme(readme: str, markdown: str, figures: tuple[str, str]) -> None:
    begin, end = "<!-- ablation:begin -->", "<!-- ablation:end -->"
    with open(readme) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} block to replace")
    docs = os.path.join(os.path.dirname(os.path.abspath(readme)), "docs")
    links = []
    for figure, name in zip(figures, ("ablation.png", "ablation_curves.png")):
        shutil.copy(figure, os.path.join(docs, name))
        links.append(f"![{name}](docs/{name})")
    block = f"{begin}\n{markdown}\n\n" + "\n".join(links) + f"\n{end}"
    with open(readme, "w") as f:
        f.write(text[:text.index(begin)] + block + text[text.index(end) + len(end):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo's 300)")
    parser.add_argument("--override", action="append", default=[], help="extra --config.X=Y for every run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each pinned to its share of the cores (the tiny model uses two "
                             "cores poorly: 2 jobs on 2 cores took ~15%% less time per run than 1, measured on "
                             "the 2-core dev machine)")
    parser.add_argument("--readme", help="README to update with the table and figures")
    args = parser.parse_args(argv)
    names = args.runs.split(",")
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {list(RUNS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.time()
    cores = sorted(os.sched_getaffinity(0))
    shares = [set(cores[i::args.jobs]) for i in range(args.jobs)] if args.jobs > 1 else [None]
    free = queue.Queue()
    for share in shares:
        free.put(share)

    def pinned(name: str, seed: int) -> dict:
        share = free.get()
        try:
            return run_one(name, seed, args, share)
        finally:
            free.put(share)

    with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
        futures = {(name, seed): pool.submit(pinned, name, seed) for name in names for seed in seeds}
        results = {name: [futures[name, seed].result() for seed in seeds] for name in names}
    markdown = table(results)
    minutes = (time.time() - start) / 60
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "steps": args.steps, "results": results}, f, indent=1)
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(markdown + "\n")
    figures = plot(results, seeds, args)
    print(markdown)
    print(f"{len(names)} runs x {len(seeds)} seeds in {minutes:.1f} min (this invocation); "
          f"figures: {', '.join(figures)}")
    if args.readme:
        update_readme(args.readme, markdown, figures)


if __name__ == "__main__":
    main()
