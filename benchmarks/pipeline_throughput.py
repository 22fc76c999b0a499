"""Input-pipeline throughput, side by side with a webdataset loader on the same JPEGs.

    python benchmarks/pipeline_throughput.py [--records_dir DIR] [--before PATH] [--workers 0,1,2]

1. Prepares ``--num_records`` photo-like generated examples at 64 and 224 px with the real writer
   (``prepare_dataset``) into ``--records_dir`` (kept, so reruns and other checkouts read the
   same records), and copies the very same JPEG bytes plus captions into webdataset tar shards.
2. Profiles the per-record costs of the pipeline's steps in this process (µs per record, CPU),
   and of a whole batch (read, parse, draws, decode, batch assembly) per record.
3. Measures each loader in a fresh subprocess: records per wall second and per CPU-second of
   the whole loader (the process, its worker processes and multiprocessing's resource tracker:
   psutil user+system time, so other load on the machine changes it less than wall time) in
   steady state, after ``--warmup_batches`` that start the workers and drain what they read
   ahead meanwhile (CPU spent before the window would otherwise count as free records); and,
   separately, the start-up: wall and CPU seconds from creating the loader to its first batch
   (worker processes importing their modules and opening the records):
   * ``grain_jax``: ``make_train_iterator`` of this checkout;
   * ``grain_jax@before``: the same of the checkout at ``--before`` (e.g. a ``git worktree``
     of an older commit), on the same records;
   * ``webdataset``: the loader open_clip users run, torch-free: ``webdataset.WebDataset`` tar
     shards -> PIL decode -> float32 mean/std normalisation -> CLIP BPE of the caption ->
     ``np.stack`` batches; with workers, one process per worker reading its own shards and
     sending batches through a ``multiprocessing`` queue (torch's DataLoader without torch);
   * ``webdataset-uint8``: the same without normalisation or tokenisation (decode + stack only).
   ``0`` workers decodes in the main thread.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTIONS = (64, 224)
SHARD_SIZE = 64


def caption(index: int) -> str:
    return f"a photo of object number {index} on a table"


def raw_examples(num_records: int, size: int = 256):
    """Generated raw examples (``grain_jax.data.prepare``'s contract) at ``size`` px, textured like photos
    (smooth colour fields plus grain: JPEG sizes close to real photos' at the same quality)."""
    rng = np.random.default_rng(0)
    for i in range(num_records):
        coarse = rng.integers(0, 255, (8, 8, 3), np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
        image = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
        regions = []
        for k in range(5):
            (x1, y1), extent = rng.uniform(0, 0.6, 2), rng.uniform(0.1, 0.4, 2)
            regions.append({"description": f"a distinctive part number {k} with a striped pattern",
                            "box": [x1, y1, x1 + extent[0], y1 + extent[1]], "score": float(rng.uniform(0.3, 1))})
        yield {"id": f"bench-{i:05d}", "image": image, "caption": caption(i),
               "mllm_caption": f"a detailed photo showing object {i} resting on a wooden table in a bright room",
               "regions": regions}


def prepare_records(records_dir: str, num_records: int) -> None:
    """Prepared records and webdataset shards (same JPEG bytes) per resolution, if not there yet."""
    from grain_jax.data import prepare
    import tensorflow_datasets as tfds

    for resolution in RESOLUTIONS:
        records = os.path.join(records_dir, f"records-{resolution}")
        shards = os.path.join(records_dir, f"wds-{resolution}")
        if not os.path.exists(os.path.join(records, "grain_jax_info.json")):
            prepare.prepare_dataset({"train": list(raw_examples(num_records))}, records, resolution=resolution,
                                    num_workers=0, progress=False)
        if os.path.isdir(shards):
            continue
        source = tfds.builder_from_directory(records).as_data_source(
            "train", decoders={"image": tfds.decode.SkipDecoding()})
        os.makedirs(shards + ".tmp", exist_ok=True)
        for start in range(0, len(source), SHARD_SIZE):
            with tarfile.open(os.path.join(shards + ".tmp", f"{start // SHARD_SIZE:05d}.tar"), "w") as tar:
                for index in range(start, min(start + SHARD_SIZE, len(source))):
                    record = source[index]
                    key = record["id"].decode()
                    text = caption(int(key.split("-")[1])).encode()
                    for suffix, payload in (("jpg", record["image"]), ("txt", text)):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        os.replace(shards + ".tmp", shards)


# ------------------------------------------------------------------------------------ webdataset loader
def _wds_batches(urls: list[str], batch_size: int, full: bool):
    """Endless numpy batches from tar shards: open_clip's per-sample work without torch."""
    import webdataset as wds
    from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from grain_jax.data import tokenizer

    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)

    def sample(jpg_txt):
        image, text = jpg_txt
        pixels = np.asarray(image.convert("RGB"))
        if not full:
            return pixels, text
        return (pixels.astype(np.float32) / 255.0 - mean) / std, tokenizer.tokenize([text], 77)[0]

    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
               .decode("pil").to_tuple("jpg", "txt").map(sample))
    images, texts = [], []
    while True:  # epochs
        for image, text in dataset:
            images.append(image)
            texts.append(text)
            if len(images) == batch_size:
                yield {"images": np.stack(images), "texts": np.stack(texts) if full else texts}
                images, texts = [], []


def _wds_worker(urls, batch_size, full, queue):
    for batch in _wds_batches(urls, batch_size, full):
        queue.put(batch)


class WebdatasetLoader:
    """``_wds_batches`` in-process, or in ``num_workers`` processes (shards split over them), round robin."""

    def __init__(self, shard_dir: str, batch_size: int, num_workers: int, full: bool):
        urls = sorted(os.path.join(shard_dir, f) for f in os.listdir(shard_dir))
        if num_workers == 0:
            self._iterator, self._queues = _wds_batches(urls, batch_size, full), None
            return
        context = multiprocessing.get_context("spawn")  # like grain's workers (and safe after importing JAX)
        self._queues = [context.Queue(maxsize=2) for _ in range(num_workers)]
        self._workers = [context.Process(target=_wds_worker, args=(urls[w::num_workers], batch_size, full, q),
                                         daemon=True) for w, q in enumerate(self._queues)]
        for worker in self._workers:
            worker.start()
        self._turn = 0

    def __next__(self):
        if self._queues is None:
            return next(self._iterator)
        batch = self._queues[self._turn].get()
        self._turn = (self._turn + 1) % len(self._queues)
        return batch

    def close(self):
        for worker in getattr(self, "_workers", []):
            worker.terminate()


# ------------------------------------------------------------------------------------ measurement
def measure(loader: str, records_dir: str, resolution: int, num_workers: int, batch_size: int,
            num_batches: int, warmup_batches: int) -> dict:
    """Runs in a fresh process: steady-state records/s (wall) and records per CPU-second of loader +
    workers, and the start-up to the first batch (wall s, CPU s)."""
    import psutil

    me = psutil.Process()
    wall_start, cpu_start = time.perf_counter(), sum(me.cpu_times()[:2])
    if loader.startswith("grain_jax"):
        from absl import flags
        from grain_jax.data import pipeline
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
        config = {"dir": os.path.join(records_dir, f"records-{resolution}"), "num_workers": num_workers,
                  "prefetch": 2 if num_workers else 0}
        iterator = pipeline.make_train_iterator(config, global_batch_size=batch_size, seed=0)
    else:
        iterator = WebdatasetLoader(os.path.join(records_dir, f"wds-{resolution}"), batch_size, num_workers,
                                    full=loader == "webdataset")
    first = next(iterator)
    processes = [me] + me.children(recursive=True)
    startup_cpu = sum(sum(p.cpu_times()[:2]) for p in processes) - cpu_start  # children: all their CPU so far
    startup_wall = time.perf_counter() - wall_start
    for _ in range(warmup_batches):
        next(iterator)
    processes = [me] + me.children(recursive=True)
    cpu_start = [sum(p.cpu_times()[:2]) for p in processes]
    faults_start = [_minor_page_faults(p.pid) for p in processes]
    wall_start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    wall = time.perf_counter() - wall_start
    cpus = [sum(p.cpu_times()[:2]) - c for p, c in zip(processes, cpu_start)]
    faults = [_minor_page_faults(p.pid) - f for p, f in zip(processes, faults_start)]
    # Worker processes are the busiest children; the others are helpers (multiprocessing's resource tracker).
    workers = sorted(range(1, len(processes)), key=lambda i: cpus[i], reverse=True)[:num_workers]
    records = num_batches * batch_size
    iterator.close()
    return {"wall_records_per_s": records / wall, "records_per_cpu_s": records / sum(cpus),
            "startup_wall_s": startup_wall, "startup_cpu_s": startup_cpu,
            "image_bytes_per_batch": int(first["images"].nbytes),
            # per batch: CPU ms of the loading process, of the workers, of other children; workers' page faults
            "parent_cpu_ms": cpus[0] / num_batches * 1e3,
            "workers_cpu_ms": sum(cpus[i] for i in workers) / num_batches * 1e3,
            "other_cpu_ms": (sum(cpus[1:]) - sum(cpus[i] for i in workers)) / num_batches * 1e3,
            "worker_page_faults": sum(faults[i] for i in workers) / num_batches}


def _minor_page_faults(pid: int) -> float:
    """Minor page faults of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return float(f.read().rsplit(")", 1)[1].split()[7])
    except OSError:
        return float("nan")


def profile(records_dir: str, resolution: int, repeats: int = 200) -> dict[str, float]:
    """CPU µs per record of each step of the pipeline (best of 3 rounds), in this process."""
    import tensorflow_datasets as tfds
    from grain_jax.data import pipeline, tokenizer, transforms

    directory = os.path.join(records_dir, f"records-{resolution}")
    builder = tfds.builder_from_directory(directory)
    serialized = builder.as_data_source("train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    by_tfds = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    decoded = builder.as_data_source("train")
    parse = pipeline._RecordParser(pipeline._check_schema(directory, builder.info.features))
    record = parse(serialized[0])
    jpeg = record["image"]
    image = transforms.decode_image(jpeg)
    options = pipeline._ExampleOptions(resolution, 77, 77, 5, 0.5, False)
    batches = pipeline._TrainBatches(serialized, parse, options, 32, seed=0)
    key = pipeline._draw_key(0)

    def draft_half():
        with Image.open(io.BytesIO(jpeg)) as im:
            im.draft("RGB", (resolution // 2, resolution // 2))
            return np.asarray(im)

    steps = {  # name -> (function, records per call)
        "read serialized record (ArrayRecord)": (lambda: serialized[0], 1),
        "read + parse, tfds (before; image left encoded)": (lambda: by_tfds[0], 1),
        "read + parse + decode, tfds's own image decoding": (lambda: decoded[0], 1),
        "read + parse, pipeline._RecordParser": (lambda: parse(serialized[0]), 1),
        "JPEG decode, PIL (transforms.decode_image)": (lambda: transforms.decode_image(jpeg), 1),
        "JPEG decode, PIL draft to half size": (draft_half, 1),
        "float32 normalise on host (before: now on device)": (
            lambda: (image.astype(np.float32) / 255 - 0.5) / 0.25, 1),
        "resize from 2x the stored size (bicubic)": (lambda: transforms.squash_resize(
            np.repeat(np.repeat(image, 2, 0), 2, 1), resolution), 1),
        "token re-truncation 77 -> 32 (5 descriptions + caption)": (lambda: tokenizer.truncate(
            np.stack([record["caption_tokens"]] * 6), 32), 1),
        "caption + flip draw (position rng)": (lambda: pipeline._position_rng(key, 5).random() < 0.5, 1),
        "whole train batch of 32 (all of the above that applies)": (lambda: batches.map(3), 32),
    }
    costs = {}
    for name, (fn, per_call) in steps.items():
        calls = max(repeats // per_call, 1)
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for _ in range(calls):
                fn()
            best = min(best, (time.process_time() - start) / calls / per_call)
        costs[name] = best * 1e6
    return costs


def _measure_in_subprocess(args, loader: str, resolution: int, num_workers: int) -> dict:
    root = args.before if loader.endswith("@before") else REPO
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    spec = json.dumps([loader, args.records_dir, resolution, num_workers, args.batch_size, args.num_batches,
                       args.warmup_batches])
    # The measuring code is always this file's; only the grain_jax it imports changes.
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", spec], env=env, cwd=root,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{loader} at {resolution} px, {num_workers} workers failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records_dir", default="/tmp/grain_jax_pipeline_bench")
    parser.add_argument("--before", default=None, help="checkout of an older grain_jax to compare against")
    parser.add_argument("--num_records", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_batches", type=int, default=48, help="timed batches per setting")
    parser.add_argument("--warmup_batches", type=int, default=16,
                        help="batches read after the first and before timing: more than the workers read ahead")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)),
                        help=f"comma-separated subset of {RESOLUTIONS}, measured in this order")
    parser.add_argument("--loaders", default="grain_jax,grain_jax@before,webdataset,webdataset-uint8")
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(*json.loads(args._measure))))
        return

    prepare_records(args.records_dir, args.num_records)
    loaders = [name for name in args.loaders.split(",") if args.before or not name.endswith("@before")]
    workers = [int(w) for w in args.workers.split(",")]
    resolutions = [int(r) for r in args.resolutions.split(",")]
    if not set(resolutions) <= set(RESOLUTIONS):
        parser.error(f"--resolutions must be a subset of {RESOLUTIONS}, got {resolutions}")
    print(f"{args.num_records} records per resolution, batch {args.batch_size}, {args.num_batches} timed batches; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start")
    for resolution in resolutions:
        costs = profile(args.records_dir, resolution)
        print(f"\nper-record CPU cost at {resolution} px (µs):")
        for name, micros in costs.items():
            print(f"  {micros:8.1f}  {name}")
    print(f"\n{'loader':>18} {'px':>4} {'workers':>7} {'records/CPU-s':>14} {'wall records/s':>15} "
          f"{'image MiB/batch':>15} {'start-up s, CPU-s':>18}")
    results = {}
    for resolution in resolutions:
        for loader in loaders:
            for num_workers in workers:
                r = _measure_in_subprocess(args, loader, resolution, num_workers)
                results[loader, resolution, num_workers] = r
                print(f"{loader:>18} {resolution:>4} {num_workers:>7} {r['records_per_cpu_s']:>14.0f} "
                      f"{r['wall_records_per_s']:>15.0f} {r['image_bytes_per_batch'] / 2**20:>15.2f} "
                      f"{r['startup_wall_s']:>8.1f}, {r['startup_cpu_s']:>7.1f}", flush=True)
    print(f"\nCPU per batch of {args.batch_size} (ms) in the loading process / its workers / other children "
          f"(resource tracker), and the workers' minor page faults per batch:")
    for (loader, resolution, num_workers), r in results.items():
        if num_workers and loader.startswith("grain_jax"):
            print(f"{loader:>18} {resolution:>4} px {num_workers} workers: {r['parent_cpu_ms']:6.1f} / "
                  f"{r['workers_cpu_ms']:6.1f} / {r['other_cpu_ms']:5.2f} ms, {r['worker_page_faults']:7.0f} faults")
    for resolution in resolutions:
        for num_workers in workers:
            ours, theirs = results[("grain_jax", resolution, num_workers)], results.get(
                ("webdataset", resolution, num_workers))
            if theirs:
                print(f"{resolution} px, {num_workers} workers: grain_jax / webdataset per CPU-second = "
                      f"{ours['records_per_cpu_s'] / theirs['records_per_cpu_s']:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
