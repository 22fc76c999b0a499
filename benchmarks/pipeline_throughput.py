"""Throughput of the grain training pipeline (records/s, and per worker) at 64 px and 224 px.

    python benchmarks/pipeline_throughput.py [--num_records 384] [--batch_size 32] [--workers 0,1,2]

Prepares `num_records` generated examples (smooth random colour fields, 5 regions each) at each
resolution with the real writer (`prepare_dataset`), then times `make_train_iterator`: JPEG
decode, normalisation, caption choice, token truncation and batching. `workers 0` runs in the
main process (one core, no prefetch): its rate, and its records per CPU-second (which other load
on the machine does not change), is what one worker delivers. Worker start-up is excluded (the
first batch is taken before the clock starts).
"""
import argparse
import os
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from grain_jax.data import pipeline, prepare

RESOLUTIONS = (64, 224)


def raw_examples(num_records: int, size: int = 256):
    """Generated raw examples (``grain_jax.data.prepare``'s contract) at ``size`` px; prepare squashes them."""
    rng = np.random.default_rng(0)
    for i in range(num_records):
        coarse = rng.integers(0, 255, (6, 6, 3), np.uint8)  # upsampled: compresses like a photo
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        regions = []
        for k in range(5):
            (x1, y1), extent = rng.uniform(0, 0.6, 2), rng.uniform(0.1, 0.4, 2)  # valid, inside the image
            x2, y2 = x1 + extent[0], y1 + extent[1]
            regions.append({"description": f"a distinctive part number {k} with a striped pattern",
                            "box": [x1, y1, x2, y2], "score": float(rng.uniform(0.3, 1))})
        yield {"id": f"bench-{i:05d}", "image": image, "caption": f"a photo of object number {i} on a table",
               "mllm_caption": f"a detailed photo showing object {i} resting on a wooden table in a bright room",
               "regions": regions}


def records_per_second(data_dir: str, num_workers: int, batch_size: int, num_batches: int) -> tuple[float, float]:
    """(records per wall-clock second, records per CPU-second of this process)."""
    config = {"dir": data_dir, "num_workers": num_workers, "prefetch": 2 if num_workers else 0}
    iterator = pipeline.make_train_iterator(config, global_batch_size=batch_size, seed=0)
    next(iterator)  # worker start-up and the first fetch are not throughput
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    records = num_batches * batch_size
    return records / (time.perf_counter() - wall), records / (time.process_time() - cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num_records", type=int, default=384)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=24, help="timed batches per setting")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers settings")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    workers = [int(w) for w in args.workers.split(",")]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in RESOLUTIONS:
            data_dir = os.path.join(tmp, f"records-{resolution}")
            prepare.prepare_dataset({"train": list(raw_examples(args.num_records))}, data_dir,
                                    resolution=resolution, num_workers=0, progress=False)
            for num_workers in workers:
                rates[resolution, num_workers] = records_per_second(data_dir, num_workers, args.batch_size,
                                                                    args.num_batches)
    print(f"{args.num_records} records per resolution, batch {args.batch_size}, {args.num_batches} timed batches, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'workers':>8} | " + " | ".join(f"{r:>3d} px records/s (per worker)" for r in RESOLUTIONS))
    for num_workers in workers:
        cells = [f"{rates[r, num_workers][0]:16.0f} ({rates[r, num_workers][0] / max(num_workers, 1):6.0f})"
                 for r in RESOLUTIONS]
        label = f"{num_workers}" + (" (main)" if num_workers == 0 else "")
        print(f"{label:>8} | " + " | ".join(f"{c:>30}" for c in cells))
    if 0 in workers:  # robust to other load on the machine: what one worker does per second of its own CPU
        print("records per CPU-second, in-process: " +
              ", ".join(f"{r} px {rates[r, 0][1]:.0f}" for r in RESOLUTIONS))


if __name__ == "__main__":
    main()
