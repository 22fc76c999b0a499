"""One process of tests/test_eval_multiprocess.py: zero-shot and retrieval of a random GRAIN over every
process's devices. Prints one JSON line: the metrics (no timings) and the example indices this process read.

    python tests/_eval_process.py SYNTHETIC_DIR CAPTIONS_JSON   (2 processes: JAX_COORDINATOR_ADDRESS etc.)
"""
import json
import sys

from grain_jax import distributed

distributed.initialize()

import jax  # noqa: E402  (after the distributed start)

from grain_jax import inference, sharding  # noqa: E402
from grain_jax.evaluators import datasets, retrieval, zeroshot  # noqa: E402


class CountingSource:
    """A dataset source that records which examples were read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(int(index))
        return self.source[index]


def main(synthetic_dir: str, captions: str) -> None:
    model = inference.load("random:grain-tiny", mesh=sharding.create_mesh((-1, 1, 1)), batch_size=8)
    classification = datasets.classification_dataset("synthetic:novel", synthetic_dir=synthetic_dir)
    classification.source = CountingSource(classification.source)
    pairs = retrieval.retrieval_dataset(f"captions:{captions}")
    pairs.source = CountingSource(pairs.source)
    timing = ("seconds", "images_per_second")
    out = {"zeroshot": zeroshot.evaluate(model, classification, templates="short", num_threads=2),
           "retrieval": retrieval.evaluate(model, pairs, num_threads=2)}
    out = {name: {k: v for k, v in metrics.items() if k not in timing} for name, metrics in out.items()}
    out["read"] = {"zeroshot": sorted(classification.source.read), "retrieval": sorted(pairs.source.read)}
    print("RESULT " + json.dumps({"process": jax.process_index(), **out}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
