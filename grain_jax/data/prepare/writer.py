"""The resumable shard writer: raw examples -> ArrayRecord shards in a TFDS folder (``prepare_dataset``).

Each split is cut into units of ``examples_per_shard`` consecutive examples; a unit is processed
(``checks.process_example``) and written in a worker process, then its summary JSON is written last,
which marks it finished. A re-run skips finished units with the same settings and ids (the
fingerprint) and publishes the same bytes; ``grain_jax_info.json`` is written last of all.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import tqdm

from grain_jax.data import records
from grain_jax.data.prepare.checks import PrepareConfig, process_example, safe_id

WORK_DIR = "shards"  # per-unit shards + reports; finished units are skipped by a resumed run


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
                ids = [safe_id(raw["id"]) if isinstance(raw, Mapping) and "id" in raw else "" for raw in chunk]
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
