"""grain-jax-annotate: GRAIN training data from images (+ alt text) with an MLLM and OWLv2.

example (then prepare the output for training):
  grain-jax-annotate --images data/images --captions data/captions.csv --output annotated/ \\
      --api_base http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct \\
      --detector owlv2-base-patch16-ensemble/
  grain-jax-prepare reference --captions annotated/captions_pooled.csv \\
      --mllm_captions annotated/captions_cc12m_pooled.json --boxes annotated/bboxes_cc12m_pooled.json \\
      --images_root data/images --output_dir prepared/

Run the same command again to resume. See pipeline.py for the files it writes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import flags

from grain_jax import cli
from grain_jax.annotate import detect, mllm, pipeline
from grain_jax.cli import console

PROGRAM = "grain-jax-annotate"
_PATHS = {"images": "directory", "captions": "file", "few_shot_root": "directory", "descriptions": "file",
          "mllm_captions": "file", "detector": "directory"}


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    # input: an image folder (optionally with a captions CSV) or webdataset tars
    flags.DEFINE_string("images", None, "image folder; CSV paths are relative to it", flag_values=fv)
    flags.DEFINE_string("captions", None, "CSV of image_path,caption rows (the reference's captions_pooled.csv)",
                        flag_values=fv)
    flags.DEFINE_string("shards", None, "webdataset tars, e.g. 'data/{00000..00099}.tar' (uncompressed)",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "output folder (also holds the resumable work files)", flag_values=fv)
    flags.DEFINE_string("part", "0/1", "I/N: annotate only every N-th image from the I-th (one part per host or "
                        "job, each with its own --output)", flag_values=fv)
    flags.DEFINE_enum("output_format", "json", list(pipeline.OUTPUT_FORMATS),
                      "json: the authors' JSON files (or annotations.json for --shards); webdataset (--shards only): "
                      "a copy of each tar with KEY.grain.json beside each image in OUTPUT/webdataset/, whole tars "
                      "per --part", flag_values=fv)
    # the MLLM (an OpenAI-compatible chat API)
    flags.DEFINE_string("api_base", "http://localhost:8000/v1", "MLLM server URL up to /v1", flag_values=fv)
    flags.DEFINE_string("model", None, "MLLM model name the server knows", flag_values=fv)
    flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "environment variable holding the API key", flag_values=fv)
    flags.DEFINE_string("regions_prompt", "regions", f"prompt file or one of {mllm.shipped_prompts()}",
                        flag_values=fv)
    flags.DEFINE_string("caption_prompt", "caption", "prompt file or shipped name", flag_values=fv)
    flags.DEFINE_string("few_shot_root", None, "folder the prompt's few-shot image paths are relative to",
                        flag_values=fv)
    flags.DEFINE_integer("concurrency", 16, "requests in flight", flag_values=fv)
    flags.DEFINE_float("timeout", 120.0, "seconds per request", flag_values=fv)
    flags.DEFINE_integer("max_retries", 6, "retries of a failed request", flag_values=fv)
    flags.DEFINE_float("backoff", 1.0, "first retry delay in seconds (doubles)", flag_values=fv)
    flags.DEFINE_integer("max_image_side", 0, "downscale larger images before sending (0: off)", flag_values=fv)
    flags.DEFINE_bool("retry_failed", False, "also re-ask images whose answer was unusable", flag_values=fv)
    flags.DEFINE_float("price_in", 0.0, "cost per 1M prompt tokens (for the progress bar)", flag_values=fv)
    flags.DEFINE_float("price_out", 0.0, "cost per 1M completion tokens", flag_values=fv)
    flags.DEFINE_integer("shard_size", 10000, "images per JSONL work shard", flag_values=fv)
    flags.DEFINE_string("descriptions", None, "bring your own: JSON {image: [descriptions]}; skips the regions "
                        "prompt", flag_values=fv)
    flags.DEFINE_string("mllm_captions", None, "bring your own: JSON {image: caption}; skips the caption prompt",
                        flag_values=fv)
    flags.DEFINE_bool("skip_caption", False, "no MLLM captions", flag_values=fv)
    # the detector (OWLv2)
    flags.DEFINE_string("detector", None, "transformers OWLv2 model folder (google/owlv2-base-patch16-ensemble)",
                        flag_values=fv)
    flags.DEFINE_enum("detector_backend", "jax", ["jax", "torch"], "OWLv2 in JAX or transformers' PyTorch model",
                      flag_values=fv)
    flags.DEFINE_string("detector_dtype", "float32", "JAX compute dtype (float32 or bfloat16)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "detector images per step (per host)", flag_values=fv)
    flags.DEFINE_bool("skip_detect", False, "no boxes (descriptions / captions only)", flag_values=fv)
    protocol = detect.Protocol()
    flags.DEFINE_float("threshold", protocol.threshold, "keep boxes scoring above this", flag_values=fv)
    flags.DEFINE_integer("num_queries", protocol.num_queries, "text queries per image (more descriptions are cut, "
                         "fewer padded)", flag_values=fv)
    flags.DEFINE_integer("squash_size", protocol.squash_size, "detector input side in pixels", flag_values=fv)
    flags.DEFINE_float("box_canvas", protocol.box_canvas, "pixel side of the canvas the written boxes are on",
                       flag_values=fv)
    flags.DEFINE_bool("no_progress", False, "no progress bars", flag_values=fv)
    return fv


def _own(path: str, what: str, items: Sequence[pipeline.Item], kind: type) -> dict[str, dict]:
    """A user's JSON {id: value} as records; wrongly typed values become failures (reported, not dropped)."""
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: the {what} JSON must map image paths to values")
    records = {}
    for it in items:
        value = table.get(it.id)
        if value is None:
            continue
        ok = isinstance(value, kind) and (kind is str or all(isinstance(v, str) for v in value))
        records[it.id] = ({"ok": True, "value": value} if ok else
                          {"ok": False, "error": f"invalid_{what}", "detail": f"{path}: not a {kind.__name__}"})
    return records


def _describe(fv: flags.FlagValues, items, name: str, prompt_name: str, usage_total: dict) -> dict[str, dict]:
    if not fv.model:
        raise console.UsageError("--model is required to ask the MLLM (or bring your own outputs: --descriptions, "
                                 "--mllm_captions or --skip_caption)")
    config = mllm.ClientConfig(api_base=fv.api_base, model=fv.model, api_key=os.environ.get(fv.api_key_env),
                               concurrency=fv.concurrency, timeout_s=fv.timeout, max_retries=fv.max_retries,
                               backoff_s=fv.backoff, max_image_side=fv.max_image_side)
    prompt = mllm.Prompt.load(prompt_name, fv.few_shot_root)
    try:
        records, usage = mllm.describe([(it.id, it.load) for it in items], os.path.join(fv.output, "work", name),
                                       config, prompt, shard_size=fv.shard_size, retry_failed=fv.retry_failed,
                                       price_in=fv.price_in, price_out=fv.price_out,
                                       show_progress=not fv.no_progress)
    except mllm.SetupError as error:  # the server cannot serve this run: the message says what to check
        raise console.Failure(str(error)) from error
    usage_total[name] = {"requests": usage.requests, "prompt_tokens": usage.prompt_tokens,
                         "completion_tokens": usage.completion_tokens, "retries": usage.retries,
                         "seconds": round(usage.seconds, 2)}
    return records


def main(argv: Sequence[str]) -> dict:
    """Runs the binary on ``argv`` (program name first); returns the summary it prints."""
    fv = _flags()
    cli.parse(argv, fv, __doc__, required=("output",), paths=_PATHS)
    if bool(fv.images) == bool(fv.shards):
        raise console.UsageError("give either --images (with optional --captions) or --shards")
    if not fv.skip_detect and not fv.detector:
        raise console.UsageError("--detector is required (or --skip_detect)")
    if fv.output_format == "webdataset" and not fv.shards:
        raise console.UsageError("--output_format webdataset needs --shards")
    part, _, parts = fv.part.partition("/")
    if not (part.isdigit() and parts.isdigit() and int(part) < int(parts)):
        raise console.UsageError(f"--part must be I/N with 0 <= I < N, got {fv.part!r}")
    part, parts = int(part), int(parts)
    problems: list[dict] = []
    shards: list[str] = []
    if fv.images:
        items = pipeline.folder_items(fv.images, fv.captions, problems)
    else:
        from grain_jax.data.prepare.sources import expand_braces
        shards = expand_braces(fv.shards)
        if fv.output_format == "webdataset":  # whole tars per part: each output tar copies one input tar
            shards, part, parts = shards[part::parts], 0, 1
        items = pipeline.webdataset_items(shards, problems)
    items = items[part::parts]
    if not items:
        raise console.UsageError(f"no images found in {fv.images or fv.shards}")
    os.makedirs(fv.output, exist_ok=True)

    usage: dict = {}
    desc_records = (_own(fv.descriptions, "descriptions", items, list) if fv.descriptions
                    else _describe(fv, items, "regions", fv.regions_prompt, usage))
    descriptions = pipeline.collect(desc_records, items, "describe", problems)
    captions = {}
    if fv.mllm_captions:
        captions = pipeline.collect(_own(fv.mllm_captions, "mllm_captions", items, str), items, "caption", problems)
    elif not fv.skip_caption:
        captions = pipeline.collect(_describe(fv, items, "caption", fv.caption_prompt, usage), items, "caption",
                                    problems)

    protocol = detect.Protocol(squash_size=fv.squash_size, num_queries=fv.num_queries, threshold=fv.threshold,
                               box_canvas=fv.box_canvas)
    boxes = None
    if not fv.skip_detect:
        detector = detect.load_detector(fv.detector, fv.detector_backend, protocol, fv.batch_size,
                                        fv.detector_dtype)
        with_desc = [it for it in items if it.id in descriptions]
        records = pipeline.run_detection(with_desc, descriptions, detector, protocol,
                                         os.path.join(fv.output, "work", "detect"),
                                         chunk=max(4 * fv.batch_size, 32), show_progress=not fv.no_progress)
        boxes = pipeline.collect(records, with_desc, "detect", problems)
        for key, record in boxes.items():
            if record["truncated"]:
                problems.append({"id": key, "stage": "detect", "kind": "description_truncated",
                                 "detail": f"cut to {detector.text_length} tokens: {record['truncated']}"})
            if not record["regions"]:
                problems.append({"id": key, "stage": "detect", "kind": "no_box_above_threshold",
                                 "detail": f"no box scored above {protocol.threshold}"})
    summary = pipeline.write_outputs(fv.output, items, descriptions, captions, boxes, problems, protocol,
                                     usage=usage, shards=shards, output_format=fv.output_format)
    print("grain-jax-annotate: " + json.dumps(summary), flush=True)
    return summary


def run(argv: Sequence[str] | None = None) -> None:
    """Console script ``grain-jax-annotate``."""
    cli.run(PROGRAM, main, argv)


if __name__ == "__main__":
    run()
