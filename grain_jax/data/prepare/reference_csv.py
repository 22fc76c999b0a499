"""The reference's captions CSV and the JSONs keyed by its image paths, read without silent mistakes.

* Columns are placed by the header when there is one (``image_path``/``image``/``path``/... and
  ``caption``/``text``/..., or ``--caption_column``); a header-less CSV must have exactly 2
  columns (path, caption). Anything else is refused with the header in the message.
* Image paths that are absolute, contain ``..`` or resolve (through symlinks) outside
  ``--images_root`` are refused per row unless ``allow_outside_root``.
* A path listed twice keeps its first row; later rows are reported.
* JSON keys that match no CSV path are counted and reported; a JSON of which (almost) no key
  matches is an error (its boxes would silently vanish and the box losses train on nothing).
* Caption fields longer than the csv module's 131,072-character default are read (and later
  truncated by the tokenizer like any long caption), and undecodable path bytes are reported
  with a printable id.
"""
from __future__ import annotations

import contextlib
import csv
import os
import sys
from typing import Any, Iterator, Sequence

from grain_jax.data.prepare.checks import safe_id

PATH_COLUMNS = ("image_path", "image", "path", "filepath", "file_path", "file", "filename", "img_path", "url_path")
CAPTION_COLUMNS = ("caption", "text", "title", "captions", "description")
MIN_MATCHED_FRACTION = 0.01  # below this share of matching keys a JSON is taken to be keyed differently


def place_columns(first_row: Sequence[str], path: str, caption_column: str | None,
                  image_suffixes: tuple[str, ...]) -> tuple[int, int, bool]:
    """(path column, caption column, first row is a header) of the CSV at ``path``; raises ValueError."""
    cells = [c.strip() for c in first_row]
    is_header = not (cells and cells[0].lower().endswith(image_suffixes))
    if is_header:
        names = [c.lower() for c in cells]
        wanted = [caption_column.lower()] if caption_column else list(CAPTION_COLUMNS)
        caption = next((names.index(n) for n in wanted if n in names), None)
        image = next((names.index(n) for n in PATH_COLUMNS if n in names), None)
        if image is None and caption is not None and len(names) == 2:
            image = 1 - caption
        if image is None or caption is None:
            hint = (f"{caption_column!r} from --caption_column" if caption_column
                    else f"one of {list(CAPTION_COLUMNS)}, or --caption_column")
            raise ValueError(f"{path}: cannot place the columns of its header {cells}: it needs an image path column "
                             f"(one of {list(PATH_COLUMNS)}) and a caption column ({hint})")
        return image, caption, True
    if caption_column is not None:
        if not caption_column.isdigit() or int(caption_column) == 0 or int(caption_column) >= len(cells):
            raise ValueError(f"{path} has no header, so --caption_column must be a column number in "
                             f"1..{len(cells) - 1} (0 is the image path), got {caption_column!r}")
        return 0, int(caption_column), False
    if len(cells) != 2:
        raise ValueError(f"{path} has {len(cells)} columns and no header, so the caption column is unknown: add a "
                         "header row (e.g. image_path,url,caption) or pass --caption_column")
    return 0, 1, False


@contextlib.contextmanager
def _no_field_limit():
    previous = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_rows(path: str, caption_column: str | None,
              image_suffixes: tuple[str, ...]) -> Iterator[tuple[int, list[str], str, str]]:
    """Yields ``(line number, row, image path, caption)`` of every data row (path "" if the row is too short)."""
    # surrogateescape: one row with undecodable bytes is reported, not a crash of the whole read.
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f, _no_field_limit():
        rows = csv.reader(f)
        first = next(rows, None)
        if first is None:
            return
        image, caption, has_header = place_columns(first, path, caption_column, image_suffixes)
        start = 1 if has_header else 0
        for number, row in enumerate(rows if has_header else _prepend(first, rows), start=start + 1):
            image_path = row[image].strip() if len(row) > image else ""
            yield number, row, image_path, row[caption] if len(row) > caption else ""


def _prepend(first: list[str], rows: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rows


def outside_root(image_path: str, images_root: str) -> str | None:
    """Why ``image_path`` (relative to ``images_root``) would read outside it, or None."""
    if os.path.isabs(image_path) or image_path.startswith(("/", "\\")):
        return "is absolute"
    if ".." in image_path.replace("\\", "/").split("/"):
        return "contains '..'"
    root = os.path.realpath(images_root)
    if os.path.commonpath([root, os.path.realpath(os.path.join(root, image_path))]) != root:
        return "resolves (through a symlink) outside --images_root"
    return None


def check_keys(table: dict[str, Any], csv_paths: set[str], what: str, json_path: str) -> str | None:
    """Raises ValueError if (almost) no key of ``table`` is a CSV image path; returns a report line
    about the unmatched keys (None when every key matches)."""
    if not table:
        return None
    unmatched = [key for key in table if key not in csv_paths]
    if not unmatched:
        return None
    matched = len(table) - len(unmatched)
    examples = ", ".join(repr(safe_id(k)) for k in unmatched[:3])
    line = (f"{what} JSON {json_path}: {len(unmatched)} of {len(table)} keys match no image path of the CSV "
            f"(e.g. {examples})")
    if matched < MIN_MATCHED_FRACTION * len(table):
        raise ValueError(f"{line}; keys must be the CSV's image paths exactly as written there (relative to "
                         "--images_root). Refusing to prepare: the records would silently lose them")
    return line
