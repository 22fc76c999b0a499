"""Throughput of grain-jax-prepare (images/s) on generated reference-format input.

    python benchmarks/prepare_throughput.py [--num_images 300] [--source_size 640x480]

Writes `num_images` JPEGs (smooth random colour fields, the size of typical web images), a
captions CSV and a boxes JSON (6 regions each), and the same samples as img2dataset tars, to a
temporary directory, then times `prepare_dataset` on the reference files at 224 px and 64 px and
on the tars at 224 px, each with 1 worker (in process) and with a pool of all cores.
Wall-clock rates depend on how busy the machine is; CPU ms/image does much less.
"""
import argparse
import io
import itertools
import json
import os
import pathlib
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from grain_jax.data import prepare
from grain_jax.data.prepare import sources as prepare_sources


def make_inputs(root: pathlib.Path, num_images: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows, boxes = ["image_path,caption"], {}
    for i in range(num_images):
        coarse = rng.integers(0, 255, (6, 8, 3), np.uint8)  # upsampled: compresses like a photo
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=90)
        (root / "img" / f"{i:06d}.jpg").write_bytes(out.getvalue())
        rows.append(f"img/{i:06d}.jpg,a photo of object number {i} on a table in a bright room")
        regions = []
        for k in range(6):
            (x1, x2), (y1, y2) = np.sort(rng.uniform(0, 960, (2, 2)), axis=1).tolist()
            regions.append({"description": f"a distinctive part number {k} with a striped pattern",
                            "bbox": [x1, y1, x2, y2], "score": float(rng.uniform(0.3, 1))})
        boxes[f"img/{i:06d}.jpg"] = regions
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "boxes.json").write_text(json.dumps(boxes))


def make_tars(root: pathlib.Path, samples_per_tar: int = 100) -> str:
    """The same images as img2dataset tars (KEY.jpg, KEY.txt, KEY.json with the regions); returns the pattern."""
    rows = (root / "captions.csv").read_text().splitlines()[1:]
    boxes = json.loads((root / "boxes.json").read_text())
    num_tars = (len(rows) + samples_per_tar - 1) // samples_per_tar
    for t in range(num_tars):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for row in rows[t * samples_per_tar:(t + 1) * samples_per_tar]:
                path, caption = row.split(",", 1)
                key = pathlib.Path(path).stem
                for name, data in ((f"{key}.jpg", (root / path).read_bytes()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"key": key, "regions": boxes[path]}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{root}/{{00000..{num_tars - 1:05d}}}.tar"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes (robust on a busy machine)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num_images", type=int, default=300)
    parser.add_argument("--source_size", default="640x480")
    args = parser.parse_args()
    width, height = map(int, args.source_size.split("x"))
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        make_inputs(root, args.num_images, width, height)
        print(f"{args.num_images} JPEGs of {width}x{height}, 6 regions each; {cores} CPU cores")
        pattern = make_tars(root)
        sources = {
            "reference": lambda: prepare_sources.reference_raw_splits(str(root / "captions.csv"), str(root),
                                                                      boxes=str(root / "boxes.json")),
            "webdataset": lambda: prepare_sources.webdataset_raw_splits(pattern),
        }
        for (source, make_raw), resolution, workers in itertools.product(sources.items(), (224, 64),
                                                                         sorted({0, cores})):
            if source == "webdataset" and resolution == 64:
                continue  # same per-image work as the reference source; one size shows the reading cost
            raw = make_raw()
            out = root / f"out-{source}-{resolution}-{workers}"
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            prepare.prepare_dataset(raw, out, resolution=resolution, num_workers=workers,
                                    examples_per_shard=50, progress=False)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
            mib = sum(f.stat().st_size for f in out.glob("grain_jax-*")) / 2 ** 20
            print(f"{source:10s} resolution {resolution:3d} workers {max(workers, 1)}: "
                  f"{args.num_images / seconds:7.1f} images/s wall ({seconds:.1f} s incl. pool start-up), "
                  f"{1000 * cpu / args.num_images:.1f} CPU ms/image; {mib:.1f} MiB written", flush=True)


if __name__ == "__main__":
    main()
