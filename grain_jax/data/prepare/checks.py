"""Per-example checks and repair: one raw example -> one record (or a reason to skip it).

A raw example is ``{"id", "image", "caption", "mllm_caption", "regions": [{"description", "box" xyxy
in [0,1], "score"}]}``; ``image`` may be encoded bytes, a uint8 array or a ``pathlib.Path`` (read in
the worker), and a source may hand over a record it already knows is bad as ``{"id", "error",
"error_kind"}``. ``process_example`` decodes, squash-resizes, tokenises and validates it and returns
the record with a report entry naming every problem skipped or repaired.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from grain_jax.data import images, records

MIN_BOX_SIZE = 1e-3  # boxes thinner than 0.1% of the image side are degenerate (GIoU/L_rd need area)


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


def safe_id(value: Any) -> str:
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
            raise _Skip("missing_image", f"cannot read {safe_id(os.fspath(image))}: {e.strerror or e}") from None
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
    return images.to_rgb(image)


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
    example_id = safe_id(raw["id"])
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
