"""The annotation stage: inputs -> describe (MLLM) -> caption (MLLM) -> detect (OWLv2) -> the authors' files.

Inputs: an image folder with a captions CSV (the reference's ``captions_pooled.csv`` format: image path
relative to the folder, alt-text caption), an image folder alone (every .jpg/.jpeg/.png under it), or
webdataset tars (``KEY.jpg|png|...`` + ``KEY.txt``; uncompressed, as img2dataset writes them).

Every stage appends to sharded JSONL under ``OUT/work/<stage>/`` as results come, so a rerun of the same
command continues where the last one stopped. A stage is skipped when the user brings its output
(``descriptions`` / ``mllm_captions`` JSON). Outputs (folder inputs), read unchanged by
``grain-jax-prepare reference``:

* ``captions_pooled.csv``: image_path, caption (the alt text; the MLLM caption when there is no CSV);
* ``captions_cc12m_pooled.json``: {image_path: MLLM caption};
* ``bboxes_cc12m_pooled.json``: {image_path: [{"description", "bbox" [x1,y1,x2,y2] on the 960 canvas, "score"}]};
* ``descriptions.json``: {image_path: [descriptions]} (the MLLM's region descriptions, all of them).

For webdataset inputs, ``annotations.json`` maps each sample key to ``{"regions", "mllm_caption", "canvas"}``
for ``grain-jax-prepare webdataset --annotations``; with ``output_format="webdataset"`` the same objects go
beside each image instead, as ``KEY.grain.json`` members of a copy of each input tar under ``OUT/webdataset/``
(read by ``grain-jax-prepare webdataset`` without ``--annotations``). ``annotate_report.json`` sums up the run and
``annotate_report.jsonl`` has one line per image with a problem (stage, kind, detail): nothing is dropped
silently.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence

import numpy as np

from grain_jax.annotate import detect, mllm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OUTPUT_FORMATS = ("json", "webdataset")
SHARDS_DIR = "webdataset"  # OUT/webdataset/: the annotated copies of the input tars


@dataclasses.dataclass
class Item:
    """One input image: its id (path relative to the folder, or sample key), a byte loader, its alt text."""
    id: str
    load: Callable[[], bytes]
    caption: str | None = None


def _file_loader(path: str) -> Callable[[], bytes]:
    def load() -> bytes:
        with open(path, "rb") as f:
            return f.read()
    return load


def folder_items(images_root: str, captions_csv: str | None, problems: list[dict]) -> list[Item]:
    """Items of an image folder, in CSV order (or sorted path order without a CSV)."""
    if captions_csv is None:
        paths = sorted(os.path.relpath(os.path.join(d, f), images_root) for d, _, files in os.walk(images_root)
                       for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        return [Item(p, _file_loader(os.path.join(images_root, p))) for p in paths]
    items, seen = [], set()
    with open(captions_csv, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row_number, row in enumerate(csv.reader(f)):
            path = row[0].strip() if row else ""
            if not path.lower().endswith(IMAGE_SUFFIXES):
                if row_number:
                    problems.append({"id": f"{os.path.basename(captions_csv)}:{row_number + 1}", "stage": "input",
                                     "kind": "not_an_image_path", "detail": ",".join(row)[:80]})
                continue
            if path in seen:
                problems.append({"id": path, "stage": "input", "kind": "duplicate_row",
                                 "detail": f"CSV row {row_number + 1} repeats an image; the first row is used"})
                continue
            seen.add(path)
            items.append(Item(path, _file_loader(os.path.join(images_root, path)), row[1] if len(row) > 1 else ""))
    return items


def _member_loader(shard: str, offset: int, size: int) -> Callable[[], bytes]:
    def load() -> bytes:
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    return load


def webdataset_items(shards: Sequence[str], problems: list[dict]) -> list[Item]:
    """Items of uncompressed webdataset tars; the image bytes are read on demand by offset.

    Samples without an image or with a ``KEY.json`` that does not parse (prepare skips those) are reported,
    not annotated.
    """
    from grain_jax.data.prepare.sources import WEBDATASET_IMAGE_EXTENSIONS, json_member, sample_key, unsafe_member

    items = []
    for shard in shards:
        samples: dict[str, dict] = collections.OrderedDict()
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if (why := unsafe_member(member)) is not None:
                        problems.append({"id": f"{shard}:{member.name}", "stage": "input",
                                         "kind": "unsafe_tar_member", "detail": why})
                        continue
                    key, extension = sample_key(member.name)
                    sample = samples.setdefault(key, {})
                    if extension in WEBDATASET_IMAGE_EXTENSIONS and "image" not in sample:
                        sample["image"] = _member_loader(shard, member.offset_data, member.size)
                    elif extension == "txt":
                        sample["caption"] = tar.extractfile(member).read().decode("utf-8", "replace")
                    elif extension == "json":
                        sample["json"] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as e:
            problems.append({"id": shard, "stage": "input", "kind": "corrupt_tar",
                             "detail": f"{e} (compressed tars are not supported: use img2dataset's plain .tar)"})
        for key, sample in samples.items():
            if "image" not in sample:
                problems.append({"id": key, "stage": "input", "kind": "missing_image",
                                 "detail": f"sample {key} in {shard} has no image member"})
                continue
            try:
                json_member(key, "json", sample)
            except ValueError as e:
                problems.append({"id": key, "stage": "input", "kind": "corrupt_sample_json", "detail": str(e)})
                continue
            items.append(Item(key, sample["image"], sample.get("caption")))
    return items


# --------------------------------------------------------------------------------------------- detect
def _squash(item: Item, size: int) -> np.ndarray | str:
    try:
        return detect.squash(item.load(), size)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def run_detection(items: Sequence[Item], descriptions: dict[str, list[str]], detector, protocol: detect.Protocol,
                  directory: str, *, chunk: int = 64, workers: int = 8, show_progress: bool = True) -> dict:
    """Boxes for every item with descriptions (resumable): {id: record} with "regions", "truncated" or "error"."""
    from tqdm import tqdm

    store = mllm.ShardedJsonl(directory, shard_size=10000)
    done = store.load()
    index = {item.id: i for i, item in enumerate(items)}
    todo = [item for item in items if item.id in descriptions and item.id not in done]
    bar = tqdm(total=len(todo), unit="img", desc="detect", disable=not show_progress, dynamic_ncols=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(todo), chunk):
                batch = todo[start:start + chunk]
                squashed = list(pool.map(lambda it: _squash(it, protocol.squash_size), batch))
                ok = [(it, img) for it, img in zip(batch, squashed) if not isinstance(img, str)]
                for it, why in zip(batch, squashed):
                    if isinstance(why, str):
                        record = {"id": it.id, "ok": False, "error": "unreadable_image", "detail": why}
                        store.append(index[it.id], record)
                        done[it.id] = record
                if ok:
                    queries, tokens, cut = [], [], []
                    for it, _ in ok:
                        q = detect.make_queries(descriptions[it.id], protocol.num_queries)
                        t, c = detect.tokenize_queries(q, detector.text_length)
                        queries.append(q), tokens.append(t), cut.append([q[i] for i in c])
                    scores, labels, boxes = detector.raw(np.stack([img for _, img in ok]), np.stack(tokens))
                    for row, ((it, _), q, c) in enumerate(zip(ok, queries, cut)):
                        regions = detect.detections(scores[row], labels[row], boxes[row], q, protocol.threshold)
                        record = {"id": it.id, "ok": True, "regions": regions, "truncated": c}
                        store.append(index[it.id], record)
                        done[it.id] = record
                bar.update(len(batch))
    finally:
        store.close()
        bar.close()
    return done


# --------------------------------------------------------------------------------------------- outputs
def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)
    os.replace(tmp, path)


def histogram(counts: Sequence[int]) -> dict[str, int]:
    """Boxes per image -> {"0": n, "1": n, ..., "10+": n} (the counts estimate_queries.py summarised)."""
    bins = collections.Counter(str(c) if c < 10 else "10+" for c in counts)
    return {k: bins[k] for k in [str(i) for i in range(10)] + ["10+"] if bins[k]}


def write_outputs(output_dir: str, items: Sequence[Item], descriptions: dict, captions: dict, boxes: dict | None,
                  problems: list[dict], protocol: detect.Protocol, usage: dict, shards: Sequence[str] = (),
                  output_format: str = "json") -> dict:
    """The outputs, annotate_report.json(l); returns the report summary.

    Folder inputs get the authors' files; webdataset inputs (the tars in ``shards``) annotations.json, or
    the annotated tars with ``output_format="webdataset"``.
    """
    unreadable = {p["id"] for p in problems if p["kind"] == "unreadable_image"}
    kept = [it for it in items if it.id not in unreadable]
    regions = {it.id: boxes[it.id]["regions"] for it in kept if boxes and boxes.get(it.id, {}).get("ok")}
    output_shards = None
    if shards:
        annotations = {it.id: {"regions": regions.get(it.id, []), "mllm_caption": captions.get(it.id),
                               "canvas": protocol.box_canvas} for it in kept}
        if output_format == "webdataset":
            output_shards = write_shards(os.path.join(output_dir, SHARDS_DIR), shards, annotations)
        else:
            _write_json(os.path.join(output_dir, "annotations.json"), annotations)
    else:
        with open(os.path.join(output_dir, "captions_pooled.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "caption"])
            for it in kept:
                caption = it.caption if it.caption else captions.get(it.id, "")
                if not caption:
                    problems.append({"id": it.id, "stage": "output", "kind": "no_caption",
                                     "detail": "no alt-text caption and no MLLM caption (prepare will skip it)"})
                writer.writerow([it.id, caption])
        _write_json(os.path.join(output_dir, "captions_cc12m_pooled.json"),
                    {it.id: captions[it.id] for it in kept if it.id in captions})
        _write_json(os.path.join(output_dir, "bboxes_cc12m_pooled.json"), regions)
    _write_json(os.path.join(output_dir, "descriptions.json"),
                {it.id: descriptions[it.id] for it in kept if it.id in descriptions})

    box_counts = [len(regions[i]) for i in regions]
    kinds = collections.Counter(p["kind"] for p in problems)
    summary = {
        "images": len(items), "images_with_boxes": sum(c > 0 for c in box_counts),
        "images_with_descriptions": sum(it.id in descriptions for it in kept),
        "images_with_mllm_caption": sum(it.id in captions for it in kept),
        "problems": dict(sorted(kinds.items())),
        "descriptions_per_image": _stats([len(descriptions[it.id]) for it in kept if it.id in descriptions]),
        "boxes_per_image": _stats(box_counts), "boxes_per_image_histogram": histogram(box_counts),
        "threshold": protocol.threshold, "num_queries": protocol.num_queries, "squash_size": protocol.squash_size,
        "box_canvas": protocol.box_canvas, "usage": usage,
    }
    if output_shards is not None:
        summary["output_shards"] = output_shards
    _write_json(os.path.join(output_dir, "annotate_report.json"), summary)
    with open(os.path.join(output_dir, "annotate_report.jsonl"), "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return summary


def write_shards(directory: str, shards: Sequence[str], annotations: dict[str, dict]) -> dict[str, int]:
    """A copy of each input tar, ``directory/<its name>``, with ``KEY.grain.json`` after each annotated sample.

    A tar is written under a temporary name and renamed when complete, so a rerun keeps (never rewrites)
    the tars already there: delete one to have it written again. Returns {"written": n, "kept": n}.
    """
    names = collections.Counter(os.path.basename(shard) for shard in shards)
    if clashes := sorted(name for name, count in names.items() if count > 1):
        raise ValueError(f"input tars share the file names {clashes}; the output has one tar per name")
    os.makedirs(directory, exist_ok=True)
    counts = {"written": 0, "kept": 0}
    for shard in shards:
        path = os.path.join(directory, os.path.basename(shard))
        if os.path.exists(path):
            counts["kept"] += 1
            continue
        _copy_annotated(shard, path + ".tmp", annotations)
        os.replace(path + ".tmp", path)
        counts["written"] += 1
    return counts


def _copy_annotated(shard: str, path: str, annotations: dict[str, dict]) -> None:
    """`shard`'s samples as prepare reads them, each followed by its ``KEY.grain.json`` (when annotated).

    Not copied: refused members and the sample a corrupt tar ends in (both reported at input), and old
    ``KEY.grain.json`` members (this run's annotations replace them).
    """
    from grain_jax.data.prepare.sources import ANNOTATION_EXTENSION, sample_key, unsafe_member

    def flush(key: str | None, members: list) -> None:
        if key in annotations:
            data = json.dumps(annotations[key], ensure_ascii=False).encode()
            info = tarfile.TarInfo(f"{key}.{ANNOTATION_EXTENSION}")
            info.size = len(data)
            members.append((info, data))
        for info, data in members:
            out.addfile(info, io.BytesIO(data))

    key, members = None, []  # a sample is written once whole: webdataset keeps its members consecutive
    with tarfile.open(path, "w") as out:
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    member_key, extension = sample_key(member.name)
                    if unsafe_member(member) is not None or extension == ANNOTATION_EXTENSION:
                        continue
                    if member_key != key:
                        flush(key, members)
                        key, members = member_key, []
                    members.append((member, tar.extractfile(member).read()))
        except (OSError, tarfile.TarError, EOFError):
            return  # reported at input as corrupt_tar; the samples before it are written
        flush(key, members)


def _stats(values: Sequence[int]) -> dict:
    if not values:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": round(float(np.mean(values)), 3), "min": int(min(values)), "max": int(max(values))}


def collect(records: dict[str, dict], items: Sequence[Item], stage: str, problems: list[dict]) -> dict:
    """{id: value} of the answered items; one problem line per failed or missing item."""
    values = {}
    for it in items:
        record = records.get(it.id)
        if record is None:
            problems.append({"id": it.id, "stage": stage, "kind": "not_processed", "detail": "no result"})
        elif record["ok"]:
            values[it.id] = record["value"] if "value" in record else record
        else:
            problems.append({"id": it.id, "stage": stage, "kind": record["error"], "detail": record["detail"]})
    return values
