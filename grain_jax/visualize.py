"""Draw GRAIN's predicted boxes with their best-matching descriptions (``grain-jax-visualize``).

Each region query's box is drawn with the given description whose embedding is closest
to the region embedding (cosine in brackets); images are laid out in a PNG grid.
Python: ``draw_grounding(inference_model, images, descriptions)`` returns the PIL grid.
"""
from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def match_descriptions(grounding: dict[str, np.ndarray], description_embeddings: np.ndarray,
                       max_boxes: int | None = None) -> list[list[tuple[np.ndarray, int, float]]]:
    """Per image, [(box cxcywh, description index, cosine)] sorted by cosine, best first.

    Args:
      grounding: ``InferenceModel.ground`` output (boxes [N, Q, 4], region_embeddings [N, Q, D]).
      description_embeddings: [K, D] L2-normalised.
      max_boxes: keep at most this many boxes per image.
    """
    sims = np.einsum("nqd,kd->nqk", grounding["region_embeddings"], description_embeddings)
    out = []
    for boxes, s in zip(grounding["boxes"], sims):
        best, score = s.argmax(-1), s.max(-1)
        order = np.argsort(-score)[:max_boxes]
        out.append([(boxes[q], int(best[q]), float(score[q])) for q in order])
    return out


def place_labels(sizes: Sequence[tuple[float, float]], anchors: Sequence[tuple[float, float]], width: int,
                 height: int) -> list[tuple[float, float, float, float]]:
    """Rectangles (x0, y0, x1, y1) for labels of ``sizes`` (w, h), each as near its anchor (a box's top-left
    corner) as it can be while inside the image and overlapping no label placed before it."""
    placed: list[tuple[float, float, float, float]] = []
    for (w, h), (ax, ay) in zip(sizes, anchors):
        x = min(max(0.0, ax), max(0.0, width - w))
        start = min(max(0.0, ay), max(0.0, height - h))
        rows = [start + k * (h + 2) for k in range(int(height // (h + 2)) + 1)]
        rows += [k * (h + 2) for k in range(int(height // (h + 2)) + 1)]  # then from the top, if the bottom is full
        free = (rect for y in rows if y + h <= height
                for rect in [(x, y, x + w, y + h)]
                if all(rect[2] <= p[0] or rect[0] >= p[2] or rect[3] <= p[1] or rect[1] >= p[3] for p in placed))
        placed.append(next(free, (x, start, x + w, start + h)))
    return placed


def _draw(image: np.ndarray, matches, descriptions: Sequence[str], title: str | None = None,
          min_side: int = 256) -> Image.Image:
    """One annotated image (upscaled so that its shorter side is at least ``min_side``), with ``title``
    (e.g. the image's class) in a band above it."""
    pil = Image.fromarray(image).convert("RGB")
    scale = max(1.0, min_side / min(pil.size))
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BICUBIC)
    draw = ImageDraw.Draw(pil)
    width, height = pil.size
    labels = []
    for rank, (box, index, score) in enumerate(matches):
        cx, cy, w, h = box  # fractions of the (squashed) image = fractions of the original
        x0, y0, x1, y1 = (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height
        colour = PALETTE[rank % len(PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        labels.append(((x0 + 2, y0 + 2), f"{descriptions[index]} ({score:.2f})", colour))
    # Labels after all boxes, best match first, none covering another.
    sizes = [(r - l, b - t) for l, t, r, b in (draw.textbbox((0, 0), label) for _, label, _ in labels)]
    for (x, y, _, _), (_, label, colour) in zip(place_labels(sizes, [a for a, _, _ in labels], width, height), labels):
        draw.rectangle(draw.textbbox((x, y), label), fill=colour)
        draw.text((x, y), label, fill=(255, 255, 255))
    if not title:
        return pil
    band = draw.textbbox((0, 0), title)[3] + 8
    tile = Image.new("RGB", (width, height + band), (255, 255, 255))
    tile.paste(pil, (0, band))
    ImageDraw.Draw(tile).text((4, 4), title, fill=(0, 0, 0))
    return tile


def draw_grounding(model, images: Sequence[np.ndarray], descriptions: Sequence[str], *, max_boxes: int | None = 5,
                   columns: int = 4, output: str | None = None, titles: Sequence[str] | None = None) -> Image.Image:
    """PNG grid of ``images`` (uint8 [H, W, 3], any sizes) with GRAIN's boxes labelled by
    the best-matching of ``descriptions``, each under its title (``titles``, e.g. the class);
    saved to ``output`` when given."""
    if not descriptions:
        raise ValueError("give at least one description to match the boxes against")
    grounding = model.ground(list(images))
    matches = match_descriptions(grounding, model.encode_texts(list(descriptions)), max_boxes)
    titles = list(titles) if titles is not None else [None] * len(images)
    tiles = [_draw(np.asarray(im), m, descriptions, t) for im, m, t in zip(images, matches, titles)]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * cell_w, (i // columns) * cell_h))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        grid.save(output)
    return grid


def image_paths(spec: str) -> list[str]:
    """A comma list of files, globs or directories (every image inside) -> sorted paths."""
    from grain_jax.evaluators.datasets import IMAGE_EXTENSIONS
    paths = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"--images: {item!r} matches no file")
            paths += found
    return paths


def read_descriptions(spec: str) -> list[str]:
    """``@file`` (one description per line) or a ``;``-separated list (descriptions may contain commas)."""
    if spec.startswith("@"):
        with open(spec[1:]) as f:
            return [line.strip() for line in f if line.strip()]
    return [d.strip() for d in spec.split(";") if d.strip()]
