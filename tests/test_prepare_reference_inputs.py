"""grain-jax-prepare reference mode on inputs that used to go silently wrong or crash: CSV headers,
boxes JSONs keyed differently, duplicate paths, paths outside --images_root, 16-bit images,
undecodable path bytes and giant caption fields."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from grain_jax.cli import prepare as prepare_cli
from grain_jax.data import records
from grain_jax.data.prepare import sources

BOX = [{"description": "a thing", "bbox": [0, 0, 480, 480], "score": 0.9}]


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(out, "JPEG")
    return out.getvalue()


def _root(tmp_path, names=("a.jpg", "b.jpg", "c.jpg")):
    (tmp_path / "img").mkdir(parents=True)
    for name in names:
        (tmp_path / "img" / name).write_bytes(_jpeg())
    return tmp_path


def _splits(root, csv_text: str, **kwargs) -> dict[str, dict]:
    (root / "captions.csv").write_text(csv_text)
    splits = sources.reference_raw_splits(str(root / "captions.csv"), str(root), validation_fraction=0, **kwargs)
    return {e["id"]: e for e in splits["train"]}


def test_csv_header_places_the_caption_column(tmp_path):
    root = _root(tmp_path)
    got = _splits(root, "image_path,url,caption\nimg/a.jpg,http://x/a.jpg,a red bird\n")
    assert got["img/a.jpg"]["caption"] == "a red bird"
    got = _splits(root, "url,image,alt\nhttp://x/a.jpg,img/a.jpg,a blue bird\n", caption_column="alt")
    assert got["img/a.jpg"]["caption"] == "a blue bird"
    got = _splits(root, "img/a.jpg,http://x,a green bird\n", caption_column="2")
    assert got["img/a.jpg"]["caption"] == "a green bird"
    got = _splits(root, "img/a.jpg,plain two columns\n")  # no header, two columns: (path, caption)
    assert got["img/a.jpg"]["caption"] == "plain two columns"


def test_csv_whose_columns_cannot_be_placed_is_refused(tmp_path):
    root = _root(tmp_path)
    with pytest.raises(ValueError, match=r"has 3 columns and no header, so the caption column is unknown"):
        _splits(root, "img/a.jpg,http://x/a.jpg,a red bird\n")
    with pytest.raises(ValueError, match=r"cannot place the columns of its header \['id', 'url', 'alt'\]"):
        _splits(root, "id,url,alt\n1,http://x,a bird\n")


def test_unmatched_box_keys_are_reported_and_all_unmatched_is_an_error(tmp_path, capsys):
    root = _root(tmp_path)
    csv_text = "image_path,caption\nimg/a.jpg,a\nimg/b.jpg,b\n"
    (root / "boxes.json").write_text(json.dumps({f"/data/img/{n}.jpg": BOX for n in "ab"}))
    with pytest.raises(ValueError, match=r"boxes JSON .*: 2 of 2 keys match no image path of the CSV "
                                         r"\(e.g. '/data/img/a.jpg', '/data/img/b.jpg'\).*Refusing"):
        _splits(root, csv_text, boxes=str(root / "boxes.json"))
    (root / "boxes.json").write_text(json.dumps({"img/a.jpg": BOX, "img/zzz.jpg": BOX}))
    got = _splits(root, csv_text, boxes=str(root / "boxes.json"))
    assert len(got["img/a.jpg"]["regions"]) == 1
    assert "1 of 2 keys match no image path of the CSV (e.g. 'img/zzz.jpg')" in capsys.readouterr().out


def test_duplicate_paths_and_paths_outside_the_root_are_reported(tmp_path):
    root = _root(tmp_path / "data")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(_jpeg())
    os.symlink(outside, root / "img" / "link.jpg")
    rows = ["image_path,caption", "img/a.jpg,first", "img/a.jpg,again", "../secret.jpg,up", f"{outside},absolute",
            "img/link.jpg,through a link", "img/b.jpg,fine"]
    got = _splits(root, "\n".join(rows) + "\n")
    assert got["img/a.jpg"]["caption"] == "first" and got["img/b.jpg"]["caption"] == "fine"
    assert (got["captions.csv:3"]["error_kind"], got["captions.csv:3"]["error"]) == (
        "duplicate_image_path", "CSV row 3 repeats the image path 'img/a.jpg' of row 2; the first row is kept")
    for row, why in ((4, "contains '..'"), (5, "is absolute"), (6, "resolves (through a symlink) outside")):
        assert got[f"captions.csv:{row}"]["error_kind"] == "path_outside_root"
        assert why in got[f"captions.csv:{row}"]["error"]
    allowed = _splits(root, "\n".join(rows) + "\n", allow_outside_root=True)
    assert {"../secret.jpg", str(outside), "img/link.jpg"} <= set(allowed)


def test_end_to_end_16_bit_image_bad_path_bytes_and_giant_caption(tmp_path):
    """The real command: nothing crashes, the 16-bit image keeps its brightness, everything is reported."""
    root = _root(tmp_path, names=("giant.jpg",))
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(root / "img" / "gray16.png")  # 50% gray, mode I;16
    giant = "word " * 40_000  # 200,000 characters: over the csv module's default field limit
    rows = [b"image_path,caption", b"img/gray16.png,a gray square", b"img/giant.jpg," + giant.encode(),
            b"img/caf\xe9.jpg,a missing file whose name is not UTF-8"]
    (root / "captions.csv").write_bytes(b"\n".join(rows) + b"\n")
    out = root / "out"
    prepare_cli.main(["grain-jax-prepare", "reference", "--captions", f"{root}/captions.csv", "--images_root", str(root),
                  "--output_dir", str(out), "--resolution", "16", "--num_workers", "0",
                  "--validation_fraction", "0"])
    report = {e["id"]: e for e in records.read_report(out)}
    assert report["img/caf\ufffd.jpg"]["kinds"] == ["missing_image"]
    assert "img/caf\ufffd.jpg" in report["img/caf\ufffd.jpg"]["reason"]
    assert report["img/giant.jpg"]["kinds"] == ["text_truncated"]
    assert report["img/gray16.png"]["kinds"] == ["non_rgb_image"]
    import tensorflow_datasets as tfds
    source = tfds.builder_from_directory(str(out)).as_data_source("train")
    images = {source[i]["id"].decode(): np.asarray(source[i]["image"]) for i in range(len(source))}
    assert abs(float(images["img/gray16.png"].mean()) - 128) < 3  # not saturated to 255
