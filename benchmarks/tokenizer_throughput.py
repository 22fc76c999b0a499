"""Throughput of the CLIP BPE tokenizer (texts/s) on ~15-word captions, one process.

    python benchmarks/tokenizer_throughput.py [--num_texts 20000] [--vocabulary 2000]

Captions are drawn from a vocabulary of `vocabulary` distinct made-up words (so the BPE cache
sees realistic word reuse). Three rates: distinct texts with a cold BPE cache (fresh process),
new distinct texts over the same words (warm BPE cache: the steady state of a prepare run),
and repeated texts (whole-text cache hits, e.g. region descriptions or prompts). The cleaning
step (ftfy) is timed on its own because it dominates once the BPE cache is warm.
"""
import argparse
import time

import numpy as np

from grain_jax.data import tokenizer


def make_captions(num_texts: int, vocabulary: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(vocabulary)]
    return [" ".join(rng.choice(words, 15)) + "." for _ in range(num_texts)]


def timed(fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(*args); CPU time is the figure to trust on a busy machine."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - start, time.process_time() - start_cpu


def rate(label: str, count: int, seconds: tuple[float, float]) -> None:
    wall, cpu = seconds
    print(f"  {label:34s} {count / wall:9.0f} texts/s wall, {count / cpu:9.0f} texts per CPU-second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_texts", type=int, default=20000)
    parser.add_argument("--vocabulary", type=int, default=2000)
    args = parser.parse_args()
    texts = make_captions(args.num_texts, args.vocabulary, seed=0)
    more_texts = make_captions(args.num_texts, args.vocabulary, seed=1)[len(texts) // 2:]  # same words
    load, _ = timed(tokenizer.default_tokenizer)
    print(f"vocabulary load: {load:.2f} s")
    cold = timed(tokenizer.tokenize, texts, 77)
    warm = timed(tokenizer.tokenize, more_texts, 77)
    repeated = timed(tokenizer.tokenize, texts, 77)
    clean = timed(lambda: [tokenizer.clean(t) for t in texts])
    print("captions of 15 words, context 77, 1 process:")
    rate("distinct texts, cold BPE cache:", len(texts), cold)
    rate("distinct texts, warm BPE cache:", len(more_texts), warm)
    rate("repeated texts (text cache):", len(texts), repeated)
    rate("cleaning only (ftfy, html, spaces):", len(texts), clean)

if __name__ == "__main__":
    main()
