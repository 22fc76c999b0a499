"""grain-jax-visualize: draw GRAIN's predicted boxes with their best-matching descriptions.

    grain-jax-visualize --checkpoint workdir --images img1.jpg,img2.jpg \
        --descriptions "a red ball;a blue cube;a striped tail" --output grounding.png

See ``grain_jax.visualize`` for the drawing.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from grain_jax import inference
from grain_jax.cli import parse_argv
from grain_jax.data import images as images_lib
from grain_jax.visualize import draw_grounding, image_paths, read_descriptions


def define_flags() -> flags.FlagValues:
    """The binary's flags, in their own FlagValues (importing this module defines none)."""
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
    fv = parse_argv(define_flags(), argv)
    for name in ("checkpoint", "images", "descriptions"):
        if not fv[name].value:
            sys.exit(f"--{name} is required")
    model = inference.load(fv.checkpoint)
    images, titles = [], []
    for path in image_paths(fv.images):
        try:
            images.append(images_lib.read_rgb(path))
        except images_lib.DECODE_ERRORS as e:
            print(f"skipped unreadable image {path} ({type(e).__name__}: {e})", flush=True)
            continue
        # Each image's title: its folder, the class in an ImageFolder layout (zeroshot/novel/<class>/0000.jpg).
        titles.append(os.path.basename(os.path.dirname(os.path.abspath(path))))
    if not images:
        sys.exit(f"--images: none of {fv.images!r} could be decoded")
    draw_grounding(model, images, read_descriptions(fv.descriptions), max_boxes=fv.max_boxes,
                   columns=fv.columns, output=fv.output, titles=titles)
    print(f"wrote {fv.output}")


def run() -> None:
    """Console-script entry point (``grain-jax-visualize``)."""
    main(sys.argv)


if __name__ == "__main__":
    run()
