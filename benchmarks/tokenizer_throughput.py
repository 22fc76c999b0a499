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


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_texts", type=int, default=20000)
    parser.add_argument("--vocabulary", type=int, default=2000)
    args = parser.parse_args()
    texts = make_captions(args.num_texts, args.vocabulary, seed=0)
    more_texts = make_captions(args.num_texts, args.vocabulary, seed=1)[len(texts) // 2:]  # same words
    load = timed(tokenizer.default_tokenizer)
    print(f"vocabulary load: {load:.2f} s")
    cold = timed(tokenizer.tokenize, texts, 77)
    warm = timed(tokenizer.tokenize, more_texts, 77)
    repeated = timed(tokenizer.tokenize, texts, 77)
    clean = timed(lambda: [tokenizer.clean(t) for t in texts])
    print("captions of 15 words, context 77, 1 process:")
    print(f"  distinct texts, cold BPE cache: {len(texts) / cold:9.0f} texts/s")
    print(f"  distinct texts, warm BPE cache: {len(more_texts) / warm:9.0f} texts/s")
    print(f"  repeated texts (text cache):    {len(texts) / repeated:9.0f} texts/s")
    print(f"  cleaning only (ftfy + html + whitespace): {len(texts) / clean:9.0f} texts/s")


if __name__ == "__main__":
    main()
