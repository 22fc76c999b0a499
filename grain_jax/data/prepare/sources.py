"""Sources of raw examples (see ``checks``): the reference's files and webdataset tars."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import posixpath
import re
import tarfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from grain_jax.data import records
from grain_jax.data.prepare import reference_csv
from grain_jax.data.prepare.checks import safe_id

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the reference's rule for captions_pooled.csv rows
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ANNOTATION_EXTENSION = "grain.json"  # `KEY.grain.json`: grounding annotations beside a sample's image
REFERENCE_BOX_CANVAS = 960.0  # OWLv2 boxes of the reference are on a 960x960 canvas of the squashed image


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
                         validation_fraction: float = 0.01, caption_column: str | None = None,
                         allow_outside_root: bool = False) -> dict[str, list[dict]]:
    """Raw examples from the reference's files (captions_pooled.csv, the MLLM caption and boxes JSONs).

    CSV rows hold an image path relative to `images_root` and a caption, placed by the header
    (or `caption_column`; see `reference_csv`); rows whose path does not end in .jpg/.jpeg/.png,
    leaves `images_root` (unless `allow_outside_root`) or repeats an earlier path are reported.
    The JSONs are keyed by the same image path (unmatched keys are reported; a JSON matching
    (almost) none is an error); boxes are xyxy on the `box_canvas` pixel canvas.
    """
    mllm = _load_json(mllm_captions, "MLLM captions") or {}
    regions_by_path = _load_json(boxes, "boxes") or {}
    for what, table in (("MLLM captions", mllm), ("boxes", regions_by_path)):
        if not isinstance(table, dict):
            raise ValueError(f"the {what} JSON must map image paths to values, got {type(table).__name__}")
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    first_row: dict[str, int] = {}
    name = os.path.basename(captions)
    for number, row, path, caption in reference_csv.read_rows(captions, caption_column, IMAGE_SUFFIXES):
        row_id = f"{name}:{number}"
        outside = None if allow_outside_root else reference_csv.outside_root(path, images_root)
        if not path.lower().endswith(IMAGE_SUFFIXES):
            example = {"id": row_id, "error_kind": "not_an_image_path",
                       "error": f"CSV row {number} has no .jpg/.jpeg/.png image path: "
                                f"{safe_id(','.join(row)[:80])!r}"}
        elif outside:
            example = {"id": row_id, "error_kind": "path_outside_root",
                       "error": f"CSV row {number}: image path {safe_id(path)!r} {outside}; "
                                "refused (--allow_outside_root reads it)"}
        elif path in first_row:
            example = {"id": row_id, "error_kind": "duplicate_image_path",
                       "error": f"CSV row {number} repeats the image path {safe_id(path)!r} of row "
                                f"{first_row[path]}; the first row is kept"}
        else:
            first_row[path] = number
            example = {"id": safe_id(path), "image": pathlib.Path(images_root, path),
                       "caption": caption, "mllm_caption": mllm.get(path),
                       "regions": normalise_regions(regions_by_path.get(path), box_canvas)}
        split = "validation" if is_validation(example["id"], validation_fraction) else "train"
        splits[split].append(example)
    for what, table, json_path in (("MLLM captions", mllm, mllm_captions), ("boxes", regions_by_path, boxes)):
        line = reference_csv.check_keys(table, set(first_row), what, json_path)
        if line:
            print(f"grain-jax-prepare: {line}", flush=True)
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


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in re.split(r"[/\\]", name):
        return f"tar member {name!r} has an absolute or parent-directory path (path traversal); refused"
    if not member.isfile():
        return f"tar member {name!r} is not a regular file (link or device); refused"
    return None


class WebDatasetSource:
    """Raw examples of one split from img2dataset / webdataset tars (`KEY.jpg`, `KEY.txt`, `KEY.json`).

    A sample's grounding annotations come from, in order of precedence, the side JSON
    `{KEY: annotation}`, its `KEY.grain.json` member (what `grain-jax-annotate --output_format
    webdataset` writes) or its `KEY.json`; an annotation is either a list of regions (the reference
    boxes format) or an object with optional `regions`, `mllm_caption`, `canvas` (pixel side or
    `[width, height]` of the canvas the boxes are on) and `normalized` (true if boxes are already in
    [0,1]). A region is `{"description", "bbox" (or "box"): [x1,y1,x2,y2], "score" (optional)}`.
    Boxes are on the `box_canvas` canvas of the squashed image unless the annotation says otherwise.
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
                    keys = {sample_key(m.name)[0] if unsafe_member(m) is None
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
                    if (why := unsafe_member(member)) is not None:
                        yield from self._error(f"{os.path.basename(shard)}:{member.name}", "unsafe_tar_member", why)
                        continue
                    member_key, extension = sample_key(member.name)
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
        try:
            meta = json_member(key, "json", files)
            own = None if key in self.annotations else json_member(key, ANNOTATION_EXTENSION, files)
        except ValueError as e:
            return {"id": key, "error_kind": "corrupt_sample_json", "error": str(e)}
        meta = meta if isinstance(meta, dict) else {}
        annotation = self.annotations.get(key, own if ANNOTATION_EXTENSION in files else meta)
        if not isinstance(annotation, dict):  # a bare region list (the reference boxes format)
            annotation = {"regions": annotation}
        canvas = None if annotation.get("normalized") else annotation.get("canvas", self.box_canvas)
        image = next((files[e] for e in WEBDATASET_IMAGE_EXTENSIONS if e in files), None)
        return {"id": key, "image": image, "caption": files.get("txt", meta.get("caption")),
                "mllm_caption": annotation.get("mllm_caption", meta.get("mllm_caption")),
                "regions": normalise_regions(annotation.get("regions"), canvas)}


def json_member(key: str, extension: str, files: Mapping[str, bytes]) -> Any:
    """The parsed `KEY.<extension>` member ({} when the sample has none); ValueError naming it if not JSON."""
    if extension not in files:
        return {}
    try:
        return json.loads(files[extension])
    except ValueError as e:
        raise ValueError(f"{key}.{extension} is not JSON: {e}") from e


def sample_key(name: str) -> tuple[str, str]:
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
