"""grain-jax-prepare: turn annotated image-text data into prepared grain_jax records.

Usage:
  grain-jax-prepare reference --captions captions_pooled.csv --mllm_captions captions.json \\
      --boxes boxes.json --images_root DIR --output_dir OUT [--resolution 224] [--max_boxes 5]
  grain-jax-prepare webdataset --shards 'DIR/{00000..00099}.tar' [--annotations side.json] --output_dir OUT
  grain-jax-prepare synthetic --output_dir OUT [--num_train N] [--resolution 64]

Every source is first turned into *raw examples*
`{"id", "image", "caption", "mllm_caption", "regions": [{"description", "box" xyxy in [0,1], "score"}]}`;
one shared path (`prepare_dataset`) then decodes, squash-resizes, tokenises, validates, reports and
writes them as ArrayRecord shards in a TFDS folder (see `grain_jax.data.records`). Bad records are
skipped or repaired and each one is listed by id and reason in `OUTPUT_DIR/prepare_report.jsonl`.
Besides the documented contract, a raw example's `image` may be a `pathlib.Path` (read in the worker),
and a source may hand over a record it already knows is bad as `{"id", "error", "error_kind"}`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import posixpath
import re
import sys
import tarfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tqdm
from PIL import Image

from grain_jax.data import records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the reference's rule for captions_pooled.csv rows
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
REFERENCE_BOX_CANVAS = 960.0  # OWLv2 boxes of the reference are on a 960x960 canvas of the squashed image
MIN_BOX_SIZE = 1e-3  # boxes thinner than 0.1% of the image side are degenerate (GIoU/L_rd need area)
WORK_DIR = "shards"  # per-unit shards + reports; finished units are skipped by a resumed run


# ----------------------------------------------------------------------------------------------
# The shared per-example path
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Settings of the shared path; part of each shard's fingerprint."""
    resolution: int
    max_boxes: int = 5
    context_length: int = 77
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.resolution < 8 or self.max_boxes < 1 or self.context_length < 3:
            raise ValueError(f"invalid prepare settings {self}")

    def fingerprint(self, ids: Sequence[str]) -> str:
        """Identifies a shard's content: the settings and the ids in it, in order."""
        digest = hashlib.sha256(json.dumps([dataclasses.asdict(self), records.TOKENIZER_NAME]).encode())
        for example_id in ids:
            digest.update(example_id.encode("utf-8", "backslashreplace") + b"\0")
        return digest.hexdigest()


class _Skip(Exception):
    """The record cannot be kept: `kind` and a human-readable `detail`."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def _safe_id(value: Any) -> str:
    """A printable id: text that came from undecodable bytes is shown with replacement characters."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    text = str(value)
    try:  # bytes kept as lone surrogates by errors="surrogateescape" become replacement characters
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


class _BadText(ValueError):
    """Unusable text; `utf8` tells undecodable text from missing/empty text."""

    def __init__(self, message: str, utf8: bool = False):
        super().__init__(message)
        self.utf8 = utf8


def _text(value: Any, what: str) -> str:
    """`value` as valid, non-empty UTF-8 text; raises _BadText saying what is wrong with it."""
    if value is None:
        raise _BadText(f"{what} is missing")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadText(f"{what} is not valid UTF-8 (byte {e.start}: {e.reason})", utf8=True) from None
    if not isinstance(value, str):
        raise _BadText(f"{what} is {type(value).__name__}, not text")
    try:  # files read with errors="surrogateescape" keep undecodable bytes as lone surrogates
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadText(f"{what} is not valid UTF-8 (character {e.start})", utf8=True) from None
    if not value.strip():
        raise _BadText(f"{what} is empty")
    return value


def _decode_image(image: Any) -> Image.Image:
    """Opens bytes / a path / a uint8 [H,W,3] array as a fully decoded PIL image."""
    if isinstance(image, os.PathLike):
        try:
            image = pathlib.Path(image).read_bytes()
        except OSError as e:
            raise _Skip("missing_image", f"cannot read {os.fspath(image)}: {e.strerror or e}") from None
    if image is None:
        raise _Skip("missing_image", "the example has no image")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise _Skip("corrupt_image", f"image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    if not isinstance(image, (bytes, bytearray)):
        raise _Skip("corrupt_image", f"image is {type(image).__name__}, not encoded bytes, a path or an array")
    if not image:
        raise _Skip("corrupt_image", "image file is empty")
    try:
        decoded = Image.open(io.BytesIO(image))
        decoded.load()  # decode now: truncated files fail here, not at open
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        message = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))  # no memory addresses in reports
        raise _Skip("corrupt_image", f"cannot decode image: {message}") from None
    return decoded


def _to_rgb(image: Image.Image, repairs: list) -> Image.Image:
    if image.mode == "RGB":
        return image
    repairs.append(("non_rgb_image", f"image mode {image.mode} converted to RGB"))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL wants palette transparency resolved through RGBA
    return image.convert("RGB")


def _encode_jpeg(image: Image.Image, config: PrepareConfig) -> bytes:
    """Squash-resize (bicubic, aspect ratio not kept, as the reference) and JPEG-encode."""
    size = (config.resolution, config.resolution)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    resized.save(out, "JPEG", quality=config.jpeg_quality)
    return out.getvalue()


def _show(box: np.ndarray) -> list[float]:
    return [round(float(c), 4) for c in box]


def _valid_regions(raw_regions: Any, repairs: list) -> list[tuple[float, np.ndarray, str, int]]:
    """(score, xyxy box clipped to [0,1], description, input index) of each usable region, in input order.

    A region is dropped, with its description (one validity decision for both), when the
    description is empty/unreadable, the box is missing, malformed, non-finite, inverted or
    degenerate after clipping, or the score is not finite.
    """
    if raw_regions is None:
        return []
    if not isinstance(raw_regions, (list, tuple)):
        repairs.append(("invalid_regions", f"regions must be a list, got {type(raw_regions).__name__}; ignored"))
        return []
    kept = []
    for k, region in enumerate(raw_regions):
        if not isinstance(region, Mapping):
            repairs.append(("invalid_region", f"region {k} is {type(region).__name__}, not an object; dropped"))
            continue
        try:
            description = _text(region.get("description"), f"region {k} description")
        except _BadText as e:
            repairs.append(("invalid_description", f"{e}; region dropped"))
            continue
        box = region.get("box")
        if box is None:
            repairs.append(("description_without_box", f"region {k} ({description[:40]!r}) has no box; dropped"))
            continue
        try:
            xyxy = np.asarray(box, dtype=np.float64)
        except (TypeError, ValueError):
            xyxy = np.zeros(0)
        if xyxy.shape != (4,):
            repairs.append(("invalid_box", f"region {k} box {box!r} is not 4 numbers; dropped"))
            continue
        if not np.all(np.isfinite(xyxy)):
            repairs.append(("invalid_box", f"region {k} box {_show(xyxy)} is not finite; dropped"))
            continue
        clipped = np.clip(xyxy, 0.0, 1.0)
        width, height = clipped[2] - clipped[0], clipped[3] - clipped[1]
        if width < MIN_BOX_SIZE or height < MIN_BOX_SIZE:
            repairs.append(("invalid_box", f"region {k} box {_show(xyxy)} is inverted, outside the image or "
                                           f"degenerate after clipping to [0,1]; dropped"))
            continue
        if not np.array_equal(clipped, xyxy):
            repairs.append(("box_clipped", f"region {k} box {_show(xyxy)} clipped to [0,1]"))
        score = region.get("score", 1.0)
        try:
            score = float(score)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            repairs.append(("invalid_score", f"region {k} score {region.get('score')!r} is not a finite number; "
                                             f"dropped"))
            continue
        kept.append((score, clipped, description, k))
    return kept


def _tokenize(texts: list[str], config: PrepareConfig) -> tuple[np.ndarray, np.ndarray]:
    """int32 [N, L] tokens and bool [N] "was longer than L" (then cut, EOT kept last)."""
    from grain_jax.data import tokenizer  # imported lazily: loads the BPE vocabulary
    length = config.context_length
    # One extra position tells a text that fits exactly from one that had to be cut.
    longer = tokenizer.tokenize(texts, length + 1)
    truncated = longer[:, length] != 0
    return np.asarray(tokenizer.truncate(longer, length), np.int32), truncated


def process_example(raw: Mapping[str, Any], config: PrepareConfig) -> tuple[dict | None, dict | None]:
    """One raw example -> (record features or None if skipped, report entry or None if clean).

    The report entry is `{"id", "action": "skipped"|"repaired", "reason", "kinds"}`, where
    `reason` joins every problem found as "kind: detail".
    """
    if not isinstance(raw, Mapping) or "id" not in raw:
        raise ValueError(f"a raw example must be a dict with an 'id', got {str(raw)[:200]}")
    example_id = _safe_id(raw["id"])
    repairs: list[tuple[str, str]] = []

    def entry(action: str, problems: list[tuple[str, str]]) -> dict:
        return {"id": example_id, "action": action, "reason": "; ".join(f"{k}: {d}" for k, d in problems),
                "kinds": sorted({k for k, _ in problems})}

    try:
        if raw.get("error"):
            raise _Skip(raw.get("error_kind", "source_error"), str(raw["error"]))
        try:
            caption = _text(raw.get("caption"), "caption")
        except _BadText as e:
            raise _Skip("non_utf8_caption" if e.utf8 else "empty_caption", str(e)) from None
        image = _to_rgb(_decode_image(raw.get("image")), repairs)
        jpeg = _encode_jpeg(image, config)
    except _Skip as skip:
        return None, entry("skipped", [(skip.kind, skip.detail)] + repairs)

    mllm_caption = raw.get("mllm_caption")
    if mllm_caption is not None:
        try:
            mllm_caption = _text(mllm_caption, "MLLM caption")
        except _BadText as e:
            repairs.append(("invalid_mllm_caption", f"{e}; dropped"))
            mllm_caption = None

    regions = _valid_regions(raw.get("regions"), repairs)
    # Top max_boxes by score among the valid regions (stable: ties keep the source order).
    regions = sorted(regions, key=lambda r: -r[0])[:config.max_boxes]
    num_regions = len(regions)

    texts = [caption] + ([mllm_caption] if mllm_caption else []) + [r[2] for r in regions]
    tokens, truncated = _tokenize(texts, config)
    names = ["caption"] + (["MLLM caption"] if mllm_caption else []) + [f"region {r[3]} description"
                                                                        for r in regions]
    for name, cut in zip(names, truncated):
        if cut:
            repairs.append(("text_truncated", f"{name} cut to {config.context_length} tokens"))

    m, length = config.max_boxes, config.context_length
    description_tokens = np.zeros((m, length), np.int32)
    boxes = np.zeros((m, 4), np.float32)
    scores = np.zeros((m,), np.float32)
    if num_regions:
        xyxy = np.stack([r[1] for r in regions])
        boxes[:num_regions] = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
        scores[:num_regions] = [r[0] for r in regions]
        description_tokens[:num_regions] = tokens[len(texts) - num_regions:]
    record = {
        "id": example_id,
        "image": jpeg,
        "caption_tokens": tokens[0],
        "mllm_caption_tokens": tokens[1] if mllm_caption else np.zeros((length,), np.int32),
        "has_mllm_caption": np.bool_(mllm_caption is not None),
        "description_tokens": description_tokens,
        "boxes": boxes,
        "box_mask": np.arange(m) < num_regions,
        "box_scores": scores,
    }
    return record, (entry("repaired", repairs) if repairs else None)


# ----------------------------------------------------------------------------------------------
# Shards: units of work, run in a process pool, resumable
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Unit:
    split: str
    index: int
    examples: list
    work_dir: str
    config: PrepareConfig
    fingerprint: str

    @property
    def stem(self) -> str:
        return os.path.join(self.work_dir, f"{self.split}-{self.index:05d}")


@functools.lru_cache(maxsize=None)
def _features(config: PrepareConfig):
    return records.features(config.resolution, config.max_boxes, config.context_length)


@functools.lru_cache(maxsize=None)
def _serializer(config: PrepareConfig) -> records.RecordSerializer:
    return records.RecordSerializer(_features(config))


def _run_unit(unit: _Unit) -> dict:
    """Processes and writes one shard; returns (and stores next to it) its summary and report."""
    serialize = _serializer(unit.config)
    serialized, report = [], []
    for raw in unit.examples:
        record, entry = process_example(raw, unit.config)
        if record is not None:
            serialized.append(serialize(record))
        if entry is not None:
            report.append(dict(entry, split=unit.split))
    num_bytes = records.write_shard(unit.stem + ".array_record", serialized)
    summary = {"split": unit.split, "index": unit.index, "fingerprint": unit.fingerprint,
               "num_inputs": len(unit.examples), "num_examples": len(serialized), "num_bytes": num_bytes,
               "report": report}
    records.write_json(unit.stem + ".json", summary)  # written last: marks the unit finished
    return summary


def _current_shard(summary: Mapping[str, Any], work_dir: str) -> str | None:
    """Where a finished unit's shard file is: its work file, or where a previous run published it."""
    work_file = os.path.join(work_dir, f"{summary['split']}-{summary['index']:05d}.array_record")
    if os.path.exists(work_file):
        return work_file
    published = summary.get("published")
    if published and os.path.exists(path := os.path.join(os.path.dirname(work_dir), published)):
        return path
    return None


def _finished(unit: _Unit) -> dict | None:
    """The stored summary of `unit` if a previous run finished exactly this content."""
    try:
        with open(unit.stem + ".json", encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("fingerprint") != unit.fingerprint or _current_shard(summary, unit.work_dir) is None:
        return None
    return summary


def _chunks(iterable: Iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _remove_stale_units(work_dir: str, split: str, num_units: int) -> None:
    """Drops work files of units this run no longer has (the input shrank) and temp leftovers."""
    pattern = re.compile(rf"{re.escape(split)}-(\d{{5,}})\.(array_record|json)(\.tmp)?$")
    for name in os.listdir(work_dir):
        match = pattern.match(name)
        if match and (int(match.group(1)) >= num_units or match.group(3)):
            os.remove(os.path.join(work_dir, name))


def prepare_dataset(raw_splits: Mapping[str, Iterable[Mapping[str, Any]]], output_dir: str | os.PathLike, *,
                    resolution: int, max_boxes: int = 5, context_length: int = 77, num_workers: int | None = None,
                    examples_per_shard: int = 1000, jpeg_quality: int = 95, source: str = "custom",
                    extra_info: Mapping[str, Any] | None = None, progress: bool = True) -> dict:
    """Prepares raw examples into a TFDS/ArrayRecord folder; returns the summary (also in grain_jax_info.json).

    Args:
      raw_splits: `{split: iterable of raw examples}`; each split is cut into shards of
        `examples_per_shard` consecutive examples (shard k always holds the same examples, so the
        output does not depend on `num_workers`).
      output_dir: created if needed. Re-running on the same input skips shards already finished
        (same settings, same ids) and rewrites the published files identically.
      resolution: the square output image side (squash resize, bicubic).
      max_boxes: regions kept per image (top by score among the valid ones).
      context_length: token length of every caption and description.
      num_workers: processes (default: all CPU cores); 0 or 1 processes in this process.
      examples_per_shard: raw examples per shard.
      jpeg_quality: quality of the re-encoded JPEG.
      source: a name stored in grain_jax_info.json.
      extra_info: more entries for grain_jax_info.json (e.g. input file names).
      progress: show a tqdm progress bar.
    """
    config = PrepareConfig(resolution, max_boxes, context_length, jpeg_quality)
    output_dir = os.fspath(output_dir)
    work_dir = os.path.join(output_dir, WORK_DIR)
    os.makedirs(work_dir, exist_ok=True)
    num_workers = os.cpu_count() if num_workers is None else num_workers
    sizes = [len(v) if hasattr(v, "__len__") else None for v in raw_splits.values()]
    total = None if None in sizes else sum(sizes)

    summaries: dict[tuple[str, int], dict] = {}
    num_units: dict[str, int] = {}
    bar = tqdm.tqdm(total=total, unit="img", desc="grain-jax-prepare", disable=not progress, smoothing=0.1)
    pool = (concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
            if num_workers > 1 else None)
    in_flight: dict[concurrent.futures.Future, _Unit] = {}

    def collect_finished() -> None:
        """Waits for at least one unit in flight and records every finished one."""
        done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            unit = in_flight.pop(future)
            try:
                summary = future.result()
            except Exception as e:
                raise RuntimeError(f"preparing shard {unit.split}-{unit.index:05d} failed: {e}") from e
            summaries[unit.split, unit.index] = summary
            bar.update(summary["num_inputs"])

    try:
        for split, examples in raw_splits.items():
            if not re.fullmatch(r"[\w-]+", split):
                raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-'")
            index = -1
            for index, chunk in enumerate(_chunks(examples, examples_per_shard)):
                ids = [_safe_id(raw["id"]) if isinstance(raw, Mapping) and "id" in raw else "" for raw in chunk]
                unit = _Unit(split, index, chunk, work_dir, config, config.fingerprint(ids))
                if (summary := _finished(unit)) is not None:
                    summaries[split, index] = summary
                    bar.update(len(chunk))
                elif pool is None:
                    summaries[split, index] = _run_unit(unit)
                    bar.update(len(chunk))
                else:
                    while len(in_flight) >= 2 * num_workers:  # bounds the raw examples held in memory
                        collect_finished()
                    in_flight[pool.submit(_run_unit, unit)] = unit
            num_units[split] = index + 1
        while in_flight:
            collect_finished()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return _publish(output_dir, config, num_units, summaries, source, extra_info or {})


def _move_to_tfds_names(output_dir: str, split: str, units: Sequence[dict]) -> None:
    """Moves the shards of `units` (in order) to `grain_jax-<split>.array_record-NNNNN-of-MMMMM`.

    A previous run may have published a shard under another `-of-YYYYY` name, so every shard is
    first gathered back into the work directory. Each unit's JSON names its new place before
    the move and `_current_shard` looks in the work directory first, so a run interrupted at any
    point still finds every finished shard.
    """
    work_dir = os.path.join(output_dir, WORK_DIR)
    work_files = [os.path.join(work_dir, f"{split}-{unit['index']:05d}.array_record") for unit in units]
    for unit, work_file in zip(units, work_files):
        current = _current_shard(unit, work_dir)
        if current is None:
            raise FileNotFoundError(f"the shard of {split}-{unit['index']:05d} disappeared during the run")
        if current != work_file:
            os.replace(current, work_file)
    for index, unit in enumerate(units):
        unit["published"] = os.path.basename(records.shard_path(output_dir, split, index, len(units)))
        records.write_json(os.path.join(work_dir, f"{split}-{unit['index']:05d}.json"), unit)
    records.publish_split(output_dir, split, work_files)


def _publish(output_dir: str, config: PrepareConfig, num_units: Mapping[str, int],
             summaries: Mapping[tuple[str, int], dict], source: str, extra_info: Mapping[str, Any]) -> dict:
    """Publishes the finished units under TFDS names, writes the report, metadata and info; prints a summary.

    `grain_jax_info.json` is written last: it marks a complete prepared directory.
    """
    work_dir = os.path.join(output_dir, WORK_DIR)
    info_path = os.path.join(output_dir, records.INFO_FILE)
    if os.path.exists(info_path):
        os.remove(info_path)
    shard_lengths, num_bytes, split_stats = {}, {}, {}
    report: list[dict] = []
    for split, count in num_units.items():
        _remove_stale_units(work_dir, split, count)
        units = [summaries[split, i] for i in range(count)]
        # Empty shards are left out: TFDS/ArrayRecord cannot open an ArrayRecord file without records.
        non_empty = [u for u in units if u["num_examples"]]
        _move_to_tfds_names(output_dir, split, non_empty)
        shard_lengths[split] = [u["num_examples"] for u in non_empty]
        num_bytes[split] = sum(u["num_bytes"] for u in non_empty)
        split_report = [e for u in units for e in u["report"]]
        report += split_report
        split_stats[split] = {
            "num_examples": sum(shard_lengths[split]), "num_shards": len(non_empty),
            "num_inputs": sum(u["num_inputs"] for u in units),
            "num_skipped": sum(e["action"] == "skipped" for e in split_report),
            "num_repaired": sum(e["action"] == "repaired" for e in split_report)}

    report_path = os.path.join(output_dir, records.REPORT_FILE)
    with open(report_path + ".tmp", "w", encoding="utf-8") as f:
        for entry in report:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(report_path + ".tmp", report_path)
    if not any(shard_lengths.values()):
        raise ValueError(f"no valid record among {len(report)} inputs in {output_dir}; "
                         f"each one is listed with its reason in {report_path}")
    records.write_tfds_metadata(
        output_dir, _features(config), shard_lengths, num_bytes,
        description=f"grain_jax prepared records ({source}); see {records.INFO_FILE} and {records.REPORT_FILE}")

    kinds = collections.Counter(k for e in report for k in e["kinds"])
    summary = {
        "format": "grain_jax prepared records v1", "source": source, "resolution": config.resolution,
        "max_boxes": config.max_boxes, "context_length": config.context_length,
        "tokenizer": records.TOKENIZER_NAME, "jpeg_quality": config.jpeg_quality,
        "splits": split_stats,
        "num_examples": sum(s["num_examples"] for s in split_stats.values()),
        "num_skipped": sum(s["num_skipped"] for s in split_stats.values()),
        "num_repaired": sum(s["num_repaired"] for s in split_stats.values()),
        "report_kinds": dict(sorted(kinds.items())), "report": records.REPORT_FILE, **extra_info,
    }
    records.write_json(info_path, summary)
    per_split = ", ".join(f"{s} {v['num_examples']}" for s, v in split_stats.items())
    top_kinds = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    print(f"grain-jax-prepare: wrote {summary['num_examples']} records ({per_split}) to {output_dir}; "
          f"skipped {summary['num_skipped']}, repaired {summary['num_repaired']}"
          f"{f' ({top_kinds})' if top_kinds else ''}; report: {report_path}", flush=True)
    for split, stats in split_stats.items():
        if not stats["num_examples"]:
            print(f"grain-jax-prepare: split {split!r} has no valid record and is not written", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def is_validation(example_id: str, validation_fraction: float) -> bool:
    """Deterministic split by id: the same id always lands in the same split."""
    digest = hashlib.sha256(example_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < validation_fraction * 2.0 ** 64


def normalise_regions(regions: Any, canvas: float | Sequence[float] | None) -> Any:
    """`[{"description", "bbox"|"box": xyxy on the canvas, "score"}]` -> raw-example regions (xyxy in [0,1]).

    `canvas` is the side (or `[width, height]`) of the pixel canvas the boxes are on, or None if
    they are already normalised. Malformed entries are passed on unchanged so the shared path
    reports them.
    """
    if not isinstance(regions, list):
        return regions
    if canvas is None:
        scale = np.ones(4)
    else:
        width, height = (canvas, canvas) if np.isscalar(canvas) else canvas
        scale = np.array([width, height, width, height], np.float64)
    out = []
    for region in regions:
        if not isinstance(region, Mapping):
            out.append(region)
            continue
        box = region.get("box", region.get("bbox"))
        try:
            box = (np.asarray(box, np.float64) / scale).tolist() if box is not None else None
        except (TypeError, ValueError):
            pass  # not numbers: reported as an invalid box by the shared path
        out.append({"description": region.get("description"), "box": box, "score": region.get("score", 1.0)})
    return out


def _load_json(path: str | None, what: str) -> Any:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the {what} JSON {path}: {e}") from e


def reference_raw_splits(captions: str, images_root: str, mllm_captions: str | None = None,
                         boxes: str | None = None, box_canvas: float = REFERENCE_BOX_CANVAS,
                         validation_fraction: float = 0.01) -> dict[str, list[dict]]:
    """Raw examples from the reference's files (captions_pooled.csv, the MLLM caption and boxes JSONs).

    CSV rows are (image_path, caption), paths relative to `images_root`; rows whose path does not end
    in .jpg/.jpeg/.png are skipped and reported (a first such row is taken as a header, silently).
    The JSONs are keyed by the same image path; boxes are xyxy on the `box_canvas` pixel canvas.
    """
    mllm = _load_json(mllm_captions, "MLLM captions") or {}
    regions_by_path = _load_json(boxes, "boxes") or {}
    for what, table in (("MLLM captions", mllm), ("boxes", regions_by_path)):
        if not isinstance(table, dict):
            raise ValueError(f"the {what} JSON must map image paths to values, got {type(table).__name__}")
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    # surrogateescape: one row with undecodable bytes is reported, not a crash of the whole read.
    with open(captions, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row_number, row in enumerate(csv.reader(f)):
            path = row[0].strip() if row else ""
            if not path.lower().endswith(IMAGE_SUFFIXES):
                if row_number == 0:
                    continue
                example = {"id": f"{os.path.basename(captions)}:{row_number + 1}", "error_kind": "not_an_image_path",
                           "error": f"CSV row {row_number + 1} does not start with a .jpg/.jpeg/.png path: "
                                    f"{','.join(row)[:80]!r}"}
            else:
                example = {"id": path, "image": pathlib.Path(images_root, path),
                           "caption": row[1] if len(row) > 1 else "", "mllm_caption": mllm.get(path),
                           "regions": normalise_regions(regions_by_path.get(path), box_canvas)}
            split = "validation" if is_validation(example["id"], validation_fraction) else "train"
            splits[split].append(example)
    return splits


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar; `{x,y}` too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name):
        return f"tar member {name!r} has an absolute or parent-directory path (path traversal); refused"
    if not member.isfile():
        return f"tar member {name!r} is not a regular file (link or device); refused"
    return None


class WebDatasetSource:
    """Raw examples of one split from img2dataset / webdataset tars (`KEY.jpg`, `KEY.txt`, `KEY.json`).

    A sample's grounding annotations come from its `KEY.json` or, overriding it, from the side JSON
    `{KEY: annotation}`; an annotation is either a list of regions (the reference boxes format) or an
    object with optional `regions`, `mllm_caption`, `canvas` (pixel side or `[width, height]` of the
    canvas the boxes are on) and `normalized` (true if boxes are already in [0,1]). A region is
    `{"description", "bbox" (or "box"): [x1,y1,x2,y2], "score" (optional)}`. Boxes are on the
    `box_canvas` canvas of the squashed image unless the annotation says otherwise.
    Tar members are read in memory, never extracted; members with absolute or `..` paths and
    links are refused and reported. Each split passes over the tars once but reads the data of
    its own samples only (the split follows from the key in the member name).
    """

    def __init__(self, shards: Sequence[str], split: str, annotations: Mapping[str, Any] | None,
                 box_canvas: float, validation_fraction: float):
        self.shards, self.split, self.annotations = list(shards), split, annotations or {}
        self.box_canvas, self.validation_fraction = box_canvas, validation_fraction

    def _in_split(self, example_id: str) -> bool:
        return is_validation(example_id, self.validation_fraction) == (self.split == "validation")

    def __len__(self) -> int:
        """Samples (and refused members) of this split; reads only the tar headers."""
        count = 0
        for shard in self.shards:
            try:
                with tarfile.open(shard, "r:*") as tar:
                    keys = {_sample_key(m.name)[0] if _unsafe_member(m) is None
                            else f"{os.path.basename(shard)}:{m.name}" for m in tar}
            except (OSError, tarfile.TarError):
                keys = {shard}
            count += sum(self._in_split(k) for k in keys)
        return count

    def __iter__(self) -> Iterator[dict]:
        for shard in self.shards:
            yield from self._read_shard(shard)

    def _error(self, example_id: str, kind: str, message: str) -> list[dict]:
        """A known-bad raw example, if its id belongs to this split."""
        return [{"id": example_id, "error_kind": kind, "error": message}] if self._in_split(example_id) else []

    def _read_shard(self, shard: str) -> Iterator[dict]:
        """This split's samples of one tar; other samples' data is skipped unread."""
        if not os.path.exists(shard):
            yield from self._error(shard, "missing_shard", f"shard {shard} does not exist")
            return
        key, files = None, None  # files is None while the current sample belongs to another split
        try:
            with tarfile.open(shard, "r:*") as tar:
                for member in tar:
                    if (why := _unsafe_member(member)) is not None:
                        yield from self._error(f"{os.path.basename(shard)}:{member.name}", "unsafe_tar_member", why)
                        continue
                    member_key, extension = _sample_key(member.name)
                    if member_key != key:  # webdataset: a sample's files are consecutive
                        if files is not None:
                            yield self._example(key, files)
                        key, files = member_key, ({} if self._in_split(member_key) else None)
                    if files is not None:
                        files[extension] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError) as e:
            yield from self._error(shard, "corrupt_tar", f"cannot read {shard} from sample {key!r} on ({e}); "
                                                         f"the samples before it are kept")
            return
        if files is not None:
            yield self._example(key, files)

    def _example(self, key: str, files: Mapping[str, bytes]) -> dict:
        meta = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except ValueError as e:
                return {"id": key, "error_kind": "corrupt_sample_json", "error": f"{key}.json is not JSON: {e}"}
            if not isinstance(meta, dict):
                meta = {}
        annotation = self.annotations.get(key, meta)
        if not isinstance(annotation, dict):  # a bare region list (the reference boxes format)
            annotation = {"regions": annotation}
        canvas = None if annotation.get("normalized") else annotation.get("canvas", self.box_canvas)
        image = next((files[e] for e in WEBDATASET_IMAGE_EXTENSIONS if e in files), None)
        return {"id": key, "image": image, "caption": files.get("txt", meta.get("caption")),
                "mllm_caption": annotation.get("mllm_caption", meta.get("mllm_caption")),
                "regions": normalise_regions(annotation.get("regions"), canvas)}


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path up to the first dot of the base name."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def webdataset_raw_splits(shards: str | Sequence[str], annotations: str | None = None,
                          box_canvas: float = REFERENCE_BOX_CANVAS,
                          validation_fraction: float = 0.01) -> dict[str, WebDatasetSource]:
    """Raw examples of tars given by a brace pattern (`DIR/{00000..00099}.tar`) or a list of paths."""
    paths = expand_braces(shards) if isinstance(shards, str) else list(shards)
    if not any(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"no webdataset shard exists for {shards!r} (expanded to {len(paths)} paths)")
    side = _load_json(annotations, "annotations") or {}
    if not isinstance(side, dict):
        raise ValueError(f"the annotations JSON {annotations} must map sample keys to annotations")
    return {split: WebDatasetSource(paths, split, side, box_canvas, validation_fraction)
            for split in records.SPLITS}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

COMMANDS = ("reference", "webdataset", "synthetic")


def _define_flags():
    """The CLI flags, on their own FlagValues so importing this module defines no global flag."""
    from absl import flags
    fv = flags.FlagValues()
    flags.DEFINE_string("output_dir", None, "Where the prepared dataset is written.", flag_values=fv)
    flags.DEFINE_integer("resolution", 224, "Square image side (synthetic: 64 unless given).", flag_values=fv)
    flags.DEFINE_integer("max_boxes", 5, "Regions kept per image (top by score).", flag_values=fv)
    flags.DEFINE_integer("context_length", 77, "Tokens per caption / description.", flag_values=fv)
    flags.DEFINE_integer("num_workers", os.cpu_count(), "Worker processes (0/1: in this process).",
                         flag_values=fv)
    flags.DEFINE_float("validation_fraction", 0.01, "Fraction of ids (by hash) put in 'validation'.",
                       flag_values=fv)
    flags.DEFINE_integer("examples_per_shard", 1000, "Input examples per output shard.", flag_values=fv)
    flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the stored images.", flag_values=fv)
    flags.DEFINE_float("box_canvas", REFERENCE_BOX_CANVAS, "Pixel side of the canvas the input boxes are on.",
                       flag_values=fv)
    flags.DEFINE_string("captions", None, "reference: captions_pooled.csv (image_path, caption).",
                        flag_values=fv)
    flags.DEFINE_string("mllm_captions", None, "reference: JSON {image_path: MLLM caption}.", flag_values=fv)
    flags.DEFINE_string("boxes", None, "reference: JSON {image_path: [{description, bbox, score}]}.",
                        flag_values=fv)
    flags.DEFINE_string("images_root", None, "reference: directory the CSV image paths are relative to.",
                        flag_values=fv)
    flags.DEFINE_string("shards", None, "webdataset: tar files, brace pattern like 'DIR/{00000..00099}.tar'.",
                        flag_values=fv)
    flags.DEFINE_string("annotations", None, "webdataset: side JSON {sample key: regions or annotation}.",
                        flag_values=fv)
    flags.DEFINE_integer("num_train", None, "synthetic: training images (default: the generator's).",
                         flag_values=fv)
    return fv


_REQUIRED_FLAGS = {"reference": ("output_dir", "captions", "images_root"), "webdataset": ("output_dir", "shards"),
                   "synthetic": ("output_dir",)}
_SOURCE_FLAGS = {"reference": {"captions", "mllm_captions", "boxes", "images_root"},
                 "webdataset": {"shards", "annotations"}, "synthetic": {"num_train"}}
# Flags a command would silently ignore: the other commands' inputs, and for synthetic the
# settings its generator fixes itself.
_IGNORED_FLAGS = {
    command: set().union(*(f for other, f in _SOURCE_FLAGS.items() if other != command))
    | ({"context_length", "jpeg_quality", "examples_per_shard", "validation_fraction", "box_canvas"}
       if command == "synthetic" else set())
    for command in COMMANDS}


def main(argv: Sequence[str]) -> dict:
    """Parses `argv` (program name first) and runs one command; returns the prepare summary."""
    from absl import flags
    fv = _define_flags()
    usage = f"{__doc__}\nFlags:\n{fv.get_help()}"
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(usage)
        raise SystemExit(0)
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        raise SystemExit(f"grain-jax-prepare: {e}\n\n{usage}") from None
    if len(rest) != 2 or rest[1] not in COMMANDS:
        raise SystemExit(f"grain-jax-prepare: give exactly one command of {COMMANDS}, got {rest[1:]}\n\n{usage}")
    command = rest[1]
    missing = [f"--{name}" for name in _REQUIRED_FLAGS[command] if not fv[name].value]
    if missing:
        raise SystemExit(f"grain-jax-prepare {command}: missing {', '.join(missing)}")
    foreign = [f"--{name}" for name in sorted(_IGNORED_FLAGS[command]) if fv[name].present]
    if foreign:
        raise SystemExit(f"grain-jax-prepare {command}: {', '.join(foreign)} do not apply to this command")
    if command == "synthetic":
        from grain_jax.data import synthetic
        sizes = {"resolution": fv.resolution if fv["resolution"].present else 64}
        if fv.num_train is not None:
            sizes["num_train"] = fv.num_train
        synthetic.ensure_synthetic(fv.output_dir, max_boxes=fv.max_boxes, num_workers=fv.num_workers, **sizes)
        return records.read_info(fv.output_dir)
    common = dict(max_boxes=fv.max_boxes, context_length=fv.context_length, num_workers=fv.num_workers,
                  examples_per_shard=fv.examples_per_shard, jpeg_quality=fv.jpeg_quality)
    if command == "reference":
        raw_splits = reference_raw_splits(fv.captions, fv.images_root, fv.mllm_captions, fv.boxes,
                                          fv.box_canvas, fv.validation_fraction)
        inputs = {"captions": fv.captions, "mllm_captions": fv.mllm_captions, "boxes": fv.boxes,
                  "images_root": fv.images_root}
    else:
        raw_splits = webdataset_raw_splits(fv.shards, fv.annotations, fv.box_canvas, fv.validation_fraction)
        inputs = {"shards": fv.shards, "annotations": fv.annotations}
    return prepare_dataset(raw_splits, fv.output_dir, resolution=fv.resolution, source=command,
                           extra_info={"inputs": inputs, "validation_fraction": fv.validation_fraction}, **common)


def run() -> None:
    """Console script `grain-jax-prepare`."""
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # libraries (grain) read global absl flags; ours live on their own FlagValues
    main(sys.argv)


if __name__ == "__main__":
    run()
