"""grain-jax-prepare: turn annotated image-text data into prepared grain_jax records.

usage:
  grain-jax-prepare reference --captions captions_pooled.csv --mllm_captions captions.json \\
      --boxes boxes.json --images_root DIR --output_dir OUT [--resolution 224] [--max_boxes 5]
  grain-jax-prepare webdataset --shards 'DIR/{00000..00099}.tar' [--annotations side.json] --output_dir OUT
  grain-jax-prepare synthetic --output_dir OUT [--num_train N] [--resolution 64]

See ``grain_jax.data.prepare`` for what is written and how bad records are reported.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from grain_jax import cli
from grain_jax.cli import console
from grain_jax.data import records, synthetic
from grain_jax.data.prepare import sources
from grain_jax.data.prepare.writer import prepare_dataset

PROGRAM = "grain-jax-prepare"
_COMMON = ("resolution", "max_boxes", "num_workers")
_WRITER = (*_COMMON, "context_length", "jpeg_quality", "examples_per_shard", "validation_fraction", "box_canvas")
# The flags each command reads (the synthetic generator fixes the writer's settings itself).
COMMANDS = {
    "reference": cli.Command(required=("output_dir", "captions", "images_root"),
                             optional=(*_WRITER, "mllm_captions", "boxes", "caption_column", "allow_outside_root")),
    "webdataset": cli.Command(required=("output_dir", "shards"), optional=(*_WRITER, "annotations")),
    "synthetic": cli.Command(required=("output_dir",), optional=(*_COMMON, "num_train")),
}
_PATHS = {"captions": "file", "mllm_captions": "file", "boxes": "file", "images_root": "directory",
          "annotations": "file"}


def _flags() -> flags.FlagValues:
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
    flags.DEFINE_float("box_canvas", sources.REFERENCE_BOX_CANVAS, "Pixel side of the canvas the input boxes are on.",
                       flag_values=fv)
    flags.DEFINE_string("captions", None, "reference: captions_pooled.csv (image_path, caption).",
                        flag_values=fv)
    flags.DEFINE_string("mllm_captions", None, "reference: JSON {image_path: MLLM caption}.", flag_values=fv)
    flags.DEFINE_string("boxes", None, "reference: JSON {image_path: [{description, bbox, score}]}.",
                        flag_values=fv)
    flags.DEFINE_string("images_root", None, "reference: directory the CSV image paths are relative to.",
                        flag_values=fv)
    flags.DEFINE_string("caption_column", None, "reference: the caption column's header name (or number, for a "
                        "CSV without header); default: a column named caption/text/title.", flag_values=fv)
    flags.DEFINE_bool("allow_outside_root", False, "reference: read image paths that are absolute, contain '..' "
                      "or lead outside --images_root through symlinks (refused by default).", flag_values=fv)
    flags.DEFINE_string("shards", None, "webdataset: tar files, brace pattern like 'DIR/{00000..00099}.tar'.",
                        flag_values=fv)
    flags.DEFINE_string("annotations", None, "webdataset: side JSON {sample key: regions or annotation}.",
                        flag_values=fv)
    flags.DEFINE_integer("num_train", None, "synthetic: training images (default: the generator's).",
                         flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> dict:
    """Parses ``argv`` (program name first) and runs one command; returns the prepare summary."""
    fv = _flags()
    command = cli.parse(argv, fv, __doc__, paths=_PATHS, commands=COMMANDS)
    if command == "synthetic":
        sizes = {"resolution": fv.resolution if fv["resolution"].present else 64}
        if fv.num_train is not None:
            sizes["num_train"] = fv.num_train
        synthetic.ensure_synthetic(fv.output_dir, max_boxes=fv.max_boxes, num_workers=fv.num_workers, **sizes)
        return records.read_info(fv.output_dir)
    common = dict(max_boxes=fv.max_boxes, context_length=fv.context_length, num_workers=fv.num_workers,
                  examples_per_shard=fv.examples_per_shard, jpeg_quality=fv.jpeg_quality)
    if command == "reference":
        raw_splits = sources.reference_raw_splits(fv.captions, fv.images_root, fv.mllm_captions, fv.boxes,
                                                  fv.box_canvas, fv.validation_fraction, fv.caption_column,
                                                  fv.allow_outside_root)
        inputs = {"captions": fv.captions, "mllm_captions": fv.mllm_captions, "boxes": fv.boxes,
                  "images_root": fv.images_root}
    else:
        try:
            raw_splits = sources.webdataset_raw_splits(fv.shards, fv.annotations, fv.box_canvas,
                                                       fv.validation_fraction)
        except FileNotFoundError as error:
            raise console.UsageError(f"--shards: {error}") from None
        inputs = {"shards": fv.shards, "annotations": fv.annotations}
    return prepare_dataset(raw_splits, fv.output_dir, resolution=fv.resolution, source=command,
                           extra_info={"inputs": inputs, "validation_fraction": fv.validation_fraction}, **common)


def run(argv: Sequence[str] | None = None) -> None:
    """Console script ``grain-jax-prepare``."""
    cli.run(PROGRAM, main, argv)


if __name__ == "__main__":
    run()
