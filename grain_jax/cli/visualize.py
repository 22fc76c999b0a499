"""grain-jax-visualize: draw GRAIN's predicted boxes with their best-matching descriptions.

example:
  grain-jax-visualize --checkpoint workdir --images img1.jpg,img2.jpg \\
      --descriptions "a red ball;a blue cube;a striped tail" --output grounding.png

See ``grain_jax.visualize`` for the drawing.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from grain_jax import cli, inference
from grain_jax.cli import console
from grain_jax.data import images as images_lib
from grain_jax.visualize import draw_grounding, image_paths, read_descriptions

PROGRAM = "grain-jax-visualize"


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "Checkpoint dir or random:<model name> (a GRAIN model).", flag_values=fv)
    flags.DEFINE_string("images", None, "Comma list of image files, globs or directories.", flag_values=fv)
    flags.DEFINE_string("descriptions", None, "';'-separated descriptions, or @file with one per line.",
                        flag_values=fv)
    flags.DEFINE_string("output", "grounding.png", "Output PNG.", flag_values=fv)
    flags.DEFINE_integer("max_boxes", 5, "Boxes per image (best-matching first).", flag_values=fv)
    flags.DEFINE_integer("columns", 4, "Grid columns.", flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> None:
    """Runs the binary on ``argv`` (program name first)."""
    fv = _flags()
    cli.parse(argv, fv, __doc__, required=("checkpoint", "images", "descriptions"),
              paths={"checkpoint": "checkpoint"})
    # Before the model loads: a wrong path is a one-line mistake, found in a second.
    try:
        paths = image_paths(fv.images)
    except FileNotFoundError as error:
        raise console.UsageError(str(error)) from None
    try:
        descriptions = read_descriptions(fv.descriptions)
    except OSError as error:
        raise console.UsageError(f"--descriptions {fv.descriptions}: {error.strerror}") from None
    model = inference.load(fv.checkpoint)
    images, titles = [], []
    for path in paths:
        try:
            images.append(images_lib.read_rgb(path))
        except images_lib.DECODE_ERRORS as e:
            print(f"skipped unreadable image {path} ({type(e).__name__}: {e})", flush=True)
            continue
        # Each image's title: its folder, the class in an ImageFolder layout (zeroshot/novel/<class>/0000.jpg).
        titles.append(os.path.basename(os.path.dirname(os.path.abspath(path))))
    if not images:
        raise console.Failure(f"--images: none of {fv.images!r} could be decoded")
    draw_grounding(model, images, descriptions, max_boxes=fv.max_boxes, columns=fv.columns, output=fv.output,
                   titles=titles)
    print(f"wrote {fv.output}")


def run(argv: Sequence[str] | None = None) -> None:
    """Console script ``grain-jax-visualize``."""
    cli.run(PROGRAM, main, argv)


if __name__ == "__main__":
    run()
