"""``grain-jax-annotate``: GRAIN training data from images (+ alt text) with an MLLM and OWLv2.

    grain-jax-annotate --images data/images --captions data/captions.csv --output annotated/ \\
        --api_base http://localhost:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --detector owlv2-base-patch16-ensemble/
    grain-jax-prepare reference --captions annotated/captions_pooled.csv \\
        --mllm_captions annotated/captions_cc12m_pooled.json --boxes annotated/bboxes_cc12m_pooled.json \\
        --images_root data/images --output_dir prepared/

Run the same command again to resume. See pipeline.py for the files it writes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from grain_jax.annotate import detect, mllm, pipeline


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grain-jax-annotate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (an image folder, optionally with a captions CSV, or webdataset tars)")
    src.add_argument("--images", help="image folder; CSV paths are relative to it")
    src.add_argument("--captions", help="CSV of image_path,caption rows (the reference's captions_pooled.csv)")
    src.add_argument("--shards", help="webdataset tars, e.g. 'data/{00000..00099}.tar' (uncompressed)")
    p.add_argument("--output", required=True, help="output folder (also holds the resumable work files)")
    p.add_argument("--part", default="0/1", help="I/N: annotate only every N-th image from the I-th (one part per "
                                                 "host or job, each with its own --output)")
    p.add_argument("--output_format", choices=pipeline.OUTPUT_FORMATS, default="json",
                   help="json: the authors' JSON files (or annotations.json for --shards); webdataset (--shards "
                        "only): a copy of each tar with KEY.grain.json beside each image in OUTPUT/webdataset/, "
                        "whole tars per --part")

    m = p.add_argument_group("MLLM (OpenAI-compatible chat API)")
    m.add_argument("--api_base", default="http://localhost:8000/v1", help="server URL up to /v1")
    m.add_argument("--model", help="model name the server knows")
    m.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    m.add_argument("--regions_prompt", default="regions", help=f"prompt file or one of {mllm.shipped_prompts()}")
    m.add_argument("--caption_prompt", default="caption", help="prompt file or shipped name")
    m.add_argument("--few_shot_root", help="folder the prompt's few-shot image paths are relative to")
    m.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    m.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    m.add_argument("--max_retries", type=int, default=6)
    m.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    m.add_argument("--max_image_side", type=int, default=0, help="downscale larger images before sending (0: off)")
    m.add_argument("--retry_failed", action="store_true", help="also re-ask images whose answer was unusable")
    m.add_argument("--price_in", type=float, default=0.0, help="cost per 1M prompt tokens (for the progress bar)")
    m.add_argument("--price_out", type=float, default=0.0, help="cost per 1M completion tokens")
    m.add_argument("--shard_size", type=int, default=10000, help="images per JSONL work shard")
    m.add_argument("--descriptions", help="bring your own: JSON {image: [descriptions]}; skips the regions prompt")
    m.add_argument("--mllm_captions", help="bring your own: JSON {image: caption}; skips the caption prompt")
    m.add_argument("--skip_caption", action="store_true", help="no MLLM captions")

    d = p.add_argument_group("detector (OWLv2)")
    d.add_argument("--detector", help="transformers OWLv2 model folder (google/owlv2-base-patch16-ensemble)")
    d.add_argument("--detector_backend", choices=("jax", "torch"), default="jax")
    d.add_argument("--detector_dtype", default="float32", help="JAX compute dtype (float32 or bfloat16)")
    d.add_argument("--batch_size", type=int, default=8, help="detector images per step (per host)")
    d.add_argument("--skip_detect", action="store_true", help="no boxes (descriptions / captions only)")
    defaults = detect.Protocol()
    d.add_argument("--threshold", type=float, default=defaults.threshold)
    d.add_argument("--num_queries", type=int, default=defaults.num_queries)
    d.add_argument("--squash_size", type=int, default=defaults.squash_size)
    d.add_argument("--box_canvas", type=float, default=defaults.box_canvas)
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


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


def _describe(args, items, name: str, prompt_name: str, usage_total: dict) -> dict[str, dict]:
    if not args.model:
        raise SystemExit("grain-jax-annotate: --model is required to ask the MLLM (or bring your own outputs)")
    config = mllm.ClientConfig(api_base=args.api_base, model=args.model, api_key=os.environ.get(args.api_key_env),
                               concurrency=args.concurrency, timeout_s=args.timeout, max_retries=args.max_retries,
                               backoff_s=args.backoff, max_image_side=args.max_image_side)
    prompt = mllm.Prompt.load(prompt_name, args.few_shot_root)
    records, usage = mllm.describe([(it.id, it.load) for it in items], os.path.join(args.output, "work", name),
                                   config, prompt, shard_size=args.shard_size, retry_failed=args.retry_failed,
                                   price_in=args.price_in, price_out=args.price_out,
                                   show_progress=not args.no_progress)
    usage_total[name] = {"requests": usage.requests, "prompt_tokens": usage.prompt_tokens,
                         "completion_tokens": usage.completion_tokens, "retries": usage.retries,
                         "seconds": round(usage.seconds, 2)}
    return records


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if bool(args.images) == bool(args.shards):
        raise SystemExit("grain-jax-annotate: give either --images (with optional --captions) or --shards")
    if not args.skip_detect and not args.detector:
        raise SystemExit("grain-jax-annotate: --detector is required (or --skip_detect)")
    if args.output_format == "webdataset" and not args.shards:
        raise SystemExit("grain-jax-annotate: --output_format webdataset needs --shards")
    part, _, parts = args.part.partition("/")
    if not (part.isdigit() and parts.isdigit() and int(part) < int(parts)):
        raise SystemExit(f"grain-jax-annotate: --part must be I/N with 0 <= I < N, got {args.part!r}")
    part, parts = int(part), int(parts)
    os.makedirs(args.output, exist_ok=True)
    problems: list[dict] = []
    shards: list[str] = []
    if args.images:
        items = pipeline.folder_items(args.images, args.captions, problems)
    else:
        from grain_jax.data.prepare.sources import expand_braces
        shards = expand_braces(args.shards)
        if args.output_format == "webdataset":  # whole tars per part: each output tar copies one input tar
            shards, part, parts = shards[part::parts], 0, 1
        items = pipeline.webdataset_items(shards, problems)
    items = items[part::parts]
    if not items:
        raise SystemExit(f"grain-jax-annotate: no images found in {args.images or args.shards}")

    usage: dict = {}
    desc_records = (_own(args.descriptions, "descriptions", items, list) if args.descriptions
                    else _describe(args, items, "regions", args.regions_prompt, usage))
    descriptions = pipeline.collect(desc_records, items, "describe", problems)
    captions = {}
    if args.mllm_captions:
        captions = pipeline.collect(_own(args.mllm_captions, "mllm_captions", items, str), items, "caption", problems)
    elif not args.skip_caption:
        captions = pipeline.collect(_describe(args, items, "caption", args.caption_prompt, usage), items, "caption",
                                    problems)

    protocol = detect.Protocol(squash_size=args.squash_size, num_queries=args.num_queries, threshold=args.threshold,
                               box_canvas=args.box_canvas)
    boxes = None
    if not args.skip_detect:
        detector = detect.load_detector(args.detector, args.detector_backend, protocol, args.batch_size,
                                        args.detector_dtype)
        with_desc = [it for it in items if it.id in descriptions]
        records = pipeline.run_detection(with_desc, descriptions, detector, protocol,
                                         os.path.join(args.output, "work", "detect"),
                                         chunk=max(4 * args.batch_size, 32), show_progress=not args.no_progress)
        boxes = pipeline.collect(records, with_desc, "detect", problems)
        for key, record in boxes.items():
            if record["truncated"]:
                problems.append({"id": key, "stage": "detect", "kind": "description_truncated",
                                 "detail": f"cut to {detector.text_length} tokens: {record['truncated']}"})
            if not record["regions"]:
                problems.append({"id": key, "stage": "detect", "kind": "no_box_above_threshold",
                                 "detail": f"no box scored above {protocol.threshold}"})
    summary = pipeline.write_outputs(args.output, items, descriptions, captions, boxes, problems, protocol,
                                     usage=usage, shards=shards, output_format=args.output_format)
    print("grain-jax-annotate: " + json.dumps(summary), flush=True)
    return summary


def run() -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        main()
    except mllm.SetupError as e:
        sys.exit(f"grain-jax-annotate: {e}")


if __name__ == "__main__":
    run()
