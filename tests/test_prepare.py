"""grain-jax-prepare on small generated inputs of both formats, with every bad-record kind.

Each test asserts exactly which records were kept, skipped and repaired, that the report names
each by id and reason, and what the records read back through `tfds.builder_from_directory` hold.
"""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from grain_jax.cli import prepare as prepare_cli
from grain_jax.data import prepare, records, tokenizer
from grain_jax.data.prepare import sources, writer

R = 32  # prepared resolution
LENGTH = 77
CANVAS = 960


def _encoded(mode="RGB", color=(200, 30, 30), fmt="JPEG", size=(48, 32), **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, fmt, **save)
    return out.getvalue()


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (48, 48, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "JPEG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def _tokens(*texts) -> np.ndarray:
    return tokenizer.tokenize(list(texts), LENGTH)


def _read(directory, split="train") -> dict[str, dict]:
    source = tfds.builder_from_directory(os.fspath(directory)).as_data_source(split)
    return {source[i]["id"].decode(): source[i] for i in range(len(source))}


def _report(directory) -> dict[str, dict]:
    entries = records.read_report(directory)
    by_id = {e["id"]: e for e in entries}
    assert len(by_id) == len(entries), "one report line per record"
    return by_id


def _shard_bytes(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if ".array_record-" in name or name == records.REPORT_FILE}


def _assert_solid(image: np.ndarray, rgb) -> None:
    assert image.shape == (R, R, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), rgb, atol=4)


# ------------------------------------------------------------------------------------------------
# The reference's annotation files
# ------------------------------------------------------------------------------------------------

def _box(x1, y1, x2, y2):  # normalised xyxy -> the reference's 960-px canvas
    return [c * CANVAS for c in (x1, y1, x2, y2)]


BAD_BOX_REGIONS = [
    {"description": "nan box", "bbox": [float("nan"), 0, 100, 100], "score": 0.9},         # 0 invalid
    {"description": "inverted", "bbox": [500, 500, 100, 100], "score": 0.8},              # 1 invalid
    {"description": "outside", "bbox": _box(1.1, 1.1, 1.3, 1.3), "score": 0.7},          # 2 invalid
    {"description": "clipped", "bbox": _box(-0.1, 0, 0.5, 1.1), "score": 0.6},            # 3 kept, clipped
    {"description": "zero width", "bbox": [100, 100, 100, 400], "score": 0.95},           # 4 invalid
    {"description": "floating", "score": 0.99},                                           # 5 no box
    {"description": "", "bbox": _box(0, 0, 0.5, 0.5), "score": 0.97},                     # 6 no description
    {"description": "good", "bbox": _box(0.5, 0.5, 1, 1), "score": 0.3},                  # 7 kept
    {"description": "nan score", "bbox": _box(0, 0, 0.5, 0.5), "score": float("nan")},    # 8 invalid score
]
LONG_CAPTION = " ".join(["word"] * 100)

REFERENCE_REPORT = {  # id -> (action, kinds)
    "img/gray.png": ("repaired", ["invalid_mllm_caption", "non_rgb_image"]),  # its MLLM caption is empty
    "img/rgba.png": ("repaired", ["non_rgb_image"]),
    "img/palette.png": ("repaired", ["non_rgb_image"]),
    "img/cmyk.jpg": ("repaired", ["non_rgb_image"]),
    "img/missing.jpg": ("skipped", ["missing_image"]),
    "img/corrupt.jpg": ("skipped", ["corrupt_image"]),
    "img/truncated.jpg": ("skipped", ["corrupt_image"]),
    "img/nonutf8.jpg": ("skipped", ["non_utf8_caption"]),
    "img/empty.jpg": ("skipped", ["empty_caption"]),
    "img/boxes.jpg": ("repaired", ["box_clipped", "description_without_box", "invalid_box",
                                   "invalid_description", "invalid_score"]),
    "img/long.jpg": ("repaired", ["text_truncated"]),
    "captions.csv:15": ("skipped", ["not_an_image_path"]),
}
REFERENCE_KEPT = ["img/good.jpg", "img/many.jpg", "img/gray.png", "img/rgba.png", "img/palette.png",
                  "img/cmyk.jpg", "img/boxes.jpg", "img/long.jpg"]


def _reference_inputs(root):
    images = root / "img"
    images.mkdir()
    files = {
        "good.jpg": _encoded(), "many.jpg": _encoded(), "gray.png": _encoded("L", 128, "PNG"),
        "rgba.png": _encoded("RGBA", (0, 0, 255, 128), "PNG"),
        "palette.png": _encoded("P", 3, "PNG", transparency=3),  # palette transparency goes through RGBA
        "cmyk.jpg": _encoded("CMYK", (0, 255, 255, 0)), "corrupt.jpg": b"\xff\xd8 definitely not a jpeg",
        "truncated.jpg": _truncated_jpeg(), "nonutf8.jpg": _encoded(), "empty.jpg": _encoded(),
        "boxes.jpg": _encoded(), "long.jpg": _encoded(),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    # With 4 examples per shard the last two shards hold only bad records (and are left out).
    rows = [b"image_path,caption", b"img/good.jpg,a photo of a red bird", b"img/many.jpg,many parts",
            b"img/gray.png,a gray square", b"img/rgba.png,a transparent square", b"img/palette.png,a palette",
            b"img/cmyk.jpg,a cmyk square", b"img/boxes.jpg,bad boxes", b"img/long.jpg," + LONG_CAPTION.encode(),
            b"img/missing.jpg,gone", b"img/corrupt.jpg,corrupt", b"img/truncated.jpg,truncated",
            b"img/nonutf8.jpg,caf\xe9 bird", b"img/empty.jpg,   ", b"notes.txt,not an image"]
    (root / "captions.csv").write_bytes(b"\n".join(rows) + b"\n")
    (root / "mllm.json").write_text(json.dumps({"img/good.jpg": "a small red bird on a branch",
                                                "img/gray.png": ""}))
    boxes = {
        "img/good.jpg": [{"description": "ear", "bbox": _box(0, 0, .5, .5), "score": 0.2},
                         {"description": "wing", "bbox": _box(.5, 0, 1, .5), "score": 0.9},
                         {"description": "tail", "bbox": _box(0, .5, 1, 1), "score": 0.5}],
        "img/many.jpg": [{"description": f"part {k}", "bbox": _box(0, 0, .1 * (k + 1), .5), "score": k / 10}
                         for k in range(7)],
        "img/boxes.jpg": BAD_BOX_REGIONS,
        "img/long.jpg": [{"description": " ".join(["very"] * 90), "bbox": _box(0, 0, 1, 1), "score": 0.5}],
    }
    (root / "boxes.json").write_text(json.dumps(boxes))


def _reference_argv(root, out, *extra):
    return ["grain-jax-prepare", "reference", "--captions", f"{root}/captions.csv", "--mllm_captions",
            f"{root}/mllm.json", "--boxes", f"{root}/boxes.json", "--images_root", str(root), "--output_dir",
            str(out), "--resolution", str(R), "--num_workers", "0", "--validation_fraction", "0",
            "--examples_per_shard", "4", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    _reference_inputs(root)
    summary = prepare_cli.main(_reference_argv(root, root / "out"))
    return root, root / "out", summary


def test_reference_reports_every_bad_record_by_id_and_reason(reference):
    _, out, summary = reference
    report = _report(out)
    assert {i: (e["action"], e["kinds"]) for i, e in report.items()} == REFERENCE_REPORT
    assert "truncated" in report["img/truncated.jpg"]["reason"]
    assert "No such file" in report["img/missing.jpg"]["reason"]
    assert "mode CMYK" in report["img/cmyk.jpg"]["reason"] and "mode P" in report["img/palette.png"]["reason"]
    boxes_reason = report["img/boxes.jpg"]["reason"]
    for k in (0, 1, 2, 3, 4, 5, 6, 8):  # every problem region is named; region 7 is fine
        assert f"region {k}" in boxes_reason
    assert "region 7" not in boxes_reason
    assert report["img/long.jpg"]["reason"].count("text_truncated") == 2  # caption and description
    assert summary["num_examples"] == len(REFERENCE_KEPT)
    assert summary["num_skipped"] == 6 and summary["num_repaired"] == 6
    assert summary["splits"]["train"]["num_inputs"] == 14  # header row not counted
    assert records.read_info(out) == summary


def test_reference_records_read_back_with_the_right_values(reference):
    _, out, _ = reference
    got = _read(out)
    assert sorted(got) == sorted(REFERENCE_KEPT)
    good = got["img/good.jpg"]
    _assert_solid(good["image"], (200, 30, 30))
    np.testing.assert_array_equal(good["caption_tokens"], _tokens("a photo of a red bird")[0])
    np.testing.assert_array_equal(good["mllm_caption_tokens"], _tokens("a small red bird on a branch")[0])
    assert good["has_mllm_caption"]
    # Sorted by score: wing .9, tail .5, ear .2; xyxy on the 960 canvas -> cxcywh in [0,1].
    np.testing.assert_allclose(good["boxes"], [[.75, .25, .5, .5], [.5, .75, 1, .5], [.25, .25, .5, .5],
                                               [0, 0, 0, 0], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(good["box_scores"], [.9, .5, .2, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(good["box_mask"], [True, True, True, False, False])
    np.testing.assert_array_equal(good["description_tokens"][:3], _tokens("wing", "tail", "ear"))
    assert not good["description_tokens"][3:].any()

    many = got["img/many.jpg"]  # top 5 of 7 by score
    np.testing.assert_allclose(many["box_scores"], [.6, .5, .4, .3, .2], atol=1e-6)
    np.testing.assert_array_equal(many["description_tokens"], _tokens(*[f"part {k}" for k in (6, 5, 4, 3, 2)]))
    np.testing.assert_allclose(many["boxes"][:, 2], [.7, .6, .5, .4, .3], atol=1e-6)
    assert many["box_mask"].all() and not many["has_mllm_caption"] and not many["mllm_caption_tokens"].any()

    bad = got["img/boxes.jpg"]  # only the clipped (.6) and the good (.3) region survive, packed first
    np.testing.assert_allclose(bad["boxes"][:2], [[.25, .5, .5, 1], [.75, .75, .5, .5]], atol=1e-6)
    np.testing.assert_array_equal(bad["box_mask"], [True, True, False, False, False])
    np.testing.assert_array_equal(bad["description_tokens"][:2], _tokens("clipped", "good"))
    assert not bad["boxes"][2:].any() and not bad["description_tokens"][2:].any()

    palette_rgb = Image.open(io.BytesIO(_encoded("P", 3, "PNG", transparency=3))).convert("RGBA").getpixel((0, 0))
    for image_id, rgb in (("img/gray.png", (128,) * 3), ("img/rgba.png", (0, 0, 255)),
                          ("img/cmyk.jpg", (255, 0, 0)), ("img/palette.png", palette_rgb[:3])):
        _assert_solid(got[image_id]["image"], rgb)
    assert not got["img/gray.png"]["has_mllm_caption"]  # its empty MLLM caption was dropped

    long = got["img/long.jpg"]
    assert long["caption_tokens"][-1] == tokenizer.EOT and long["caption_tokens"].all()
    assert long["description_tokens"][0, -1] == tokenizer.EOT
    np.testing.assert_array_equal(long["caption_tokens"], _tokens(LONG_CAPTION)[0])


def test_reference_layout_is_tfds_and_shards_follow_the_input_order(reference):
    _, out, summary = reference
    names = sorted(n for n in os.listdir(out) if ".array_record-" in n)
    num_shards = summary["splits"]["train"]["num_shards"]
    assert names == [f"grain_jax-train.array_record-{k:05d}-of-{num_shards:05d}" for k in range(num_shards)]
    source = tfds.builder_from_directory(os.fspath(out)).as_data_source("train")
    assert [source[i]["id"].decode() for i in range(len(source))] == REFERENCE_KEPT
    # Shards with records are moved out of the work directory, not copied; the two empty ones stay.
    assert num_shards == 2
    assert sorted(n for n in os.listdir(out / writer.WORK_DIR) if n.endswith(".array_record")) == [
        "train-00002.array_record", "train-00003.array_record"]


def test_rerun_skips_finished_shards_and_rewrites_the_same_bytes(reference, monkeypatch):
    root, out, summary = reference
    before = _shard_bytes(out)

    def must_not_run(unit):
        raise AssertionError(f"finished shard {unit.split}-{unit.index} was processed again")

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_run_unit", must_not_run)
        assert prepare_cli.main(_reference_argv(root, out)) == summary
    assert _shard_bytes(out) == before

    # An interrupted run: one shard never finished. Only that shard is processed again.
    os.remove(out / writer.WORK_DIR / "train-00001.json")  # shard 1 (published as 00001-of-00002)
    processed = []

    def counting(unit):
        processed.append(unit.index)
        return real_run_unit(unit)

    real_run_unit = writer._run_unit
    monkeypatch.setattr(writer, "_run_unit", counting)
    assert prepare_cli.main(_reference_argv(root, out)) == summary
    assert processed == [1]
    assert _shard_bytes(out) == before


def test_output_is_the_same_with_a_process_pool(reference, tmp_path):
    root, out, _ = reference
    raw_splits = sources.reference_raw_splits(f"{root}/captions.csv", str(root), f"{root}/mllm.json",
                                              f"{root}/boxes.json", validation_fraction=0)
    prepare.prepare_dataset(raw_splits, tmp_path, resolution=R, num_workers=2, examples_per_shard=4,
                            progress=False)
    assert _shard_bytes(tmp_path) == _shard_bytes(out)


# ------------------------------------------------------------------------------------------------
# img2dataset / webdataset tars
# ------------------------------------------------------------------------------------------------

def _add(tar, name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _sample(tar, key, image=None, text=None, meta=None, image_ext="jpg", beside=None):
    """A sample's members; `meta` -> KEY.json, `beside` -> KEY.grain.json (JSON values or raw bytes)."""
    if image is not None:
        _add(tar, f"{key}.{image_ext}", image)
    if text is not None:
        _add(tar, f"{key}.txt", text)
    for extension, value in (("json", meta), (sources.ANNOTATION_EXTENSION, beside)):
        if value is not None:
            _add(tar, f"{key}.{extension}", value if isinstance(value, bytes) else json.dumps(value).encode())


WEBDATASET_REPORT = {
    "00000.tar:../evil.txt": ("skipped", ["unsafe_tar_member"]),
    "00000.tar:/abs.jpg": ("skipped", ["unsafe_tar_member"]),
    "00000.tar:link.jpg": ("skipped", ["unsafe_tar_member"]),
    "001": ("skipped", ["non_utf8_caption"]),
    "002": ("skipped", ["empty_caption"]),
    "003": ("skipped", ["corrupt_image"]),
    "004": ("skipped", ["missing_image"]),
    "005": ("repaired", ["non_rgb_image"]),
    "006": ("skipped", ["corrupt_sample_json"]),
    "100": ("repaired", ["invalid_box"]),
    "103": ("skipped", ["corrupt_sample_json"]),
}
WEBDATASET_KEPT = ["000", "005", "007", "100", "101", "102", "200"]


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("webdataset")
    with tarfile.open(root / "00000.tar", "w") as tar:
        _sample(tar, "000", _encoded(), b"a red box", {"key": "000", "mllm_caption": "a red rectangle", "regions": [
            {"description": "left half", "bbox": [0, 0, 480, 960], "score": 0.7}]})
        _add(tar, "../evil.txt", b"escape")
        _add(tar, "/abs.jpg", _encoded())
        _add(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _sample(tar, "001", _encoded("RGBA", (0, 0, 255, 255), "PNG"), b"caf\xe9", image_ext="png")
        _sample(tar, "002", _encoded(), b"")
        _sample(tar, "003", _truncated_jpeg(), b"broken")
        _sample(tar, "004", None, b"no image", {"key": "004"})
        _sample(tar, "005", _encoded("P", 3, "PNG"), b"palette", {"normalized": True, "regions": [
            {"description": "quarter", "bbox": [0, 0, 0.5, 0.5]}]}, image_ext="png")
        _sample(tar, "006", _encoded(), b"bad json", b"{not json")
        _sample(tar, "007", _encoded(), b"own canvas", {"canvas": [100, 200], "regions": [
            {"description": "x", "bbox": [0, 0, 50, 100], "score": 0.4}]})
    with tarfile.open(root / "00001.tar", "w") as tar:
        _sample(tar, "100", _encoded(), b"side annotated")
        _sample(tar, "101", _encoded(), b"side object", {"regions": [{"description": "ignored", "bbox": [0, 0, 9, 9]}]},
                beside=b"{overridden by the side JSON, so never parsed")
        _sample(tar, "102", _encoded(), b"annotated beside", {"regions": [{"description": "x", "bbox": [0, 0, 9, 9]}]},
                beside={"regions": [{"description": "bottom", "bbox": [0, 480, 960, 960], "score": 0.6}],
                        "mllm_caption": "beside mllm", "canvas": 960.0})
        _sample(tar, "103", _encoded(), b"bad beside", beside=b"[not json")
    with tarfile.open(root / "full.tar", "w") as tar:
        _sample(tar, "200", _encoded(), b"before the cut")
        _sample(tar, "201", _truncated_jpeg() * 20, b"after the cut")
    with tarfile.open(root / "full.tar") as tar:
        cut = tar.getmember("201.jpg").offset_data + 100  # inside 201.jpg
    (root / "00002.tar").write_bytes((root / "full.tar").read_bytes()[:cut])
    os.remove(root / "full.tar")
    (root / "side.json").write_text(json.dumps({
        "100": [{"description": "left", "bbox": [0, 0, 480, 960], "score": 0.3},
                {"description": "nan", "bbox": [float("nan"), 0, 1, 1], "score": 0.9}],
        "101": {"regions": [{"description": "top", "bbox": [0, 0, 1, 0.5]}], "normalized": True,
                "mllm_caption": "side mllm"}}))
    out = root / "out"
    summary = prepare_cli.main(["grain-jax-prepare", "webdataset", "--shards", f"{root}/{{00000..00002}}.tar",
                            "--annotations", f"{root}/side.json", "--output_dir", str(out), "--resolution", str(R),
                            "--num_workers", "0", "--validation_fraction", "0.5"])
    return root, out, summary


def test_webdataset_reports_every_bad_record_by_id_and_reason(webdataset):
    root, out, summary = webdataset
    report = _report(out)
    cut_tar = f"{root}/00002.tar"  # tar-level problems are reported under the tar's path
    assert {i: (e["action"], e["kinds"]) for i, e in report.items()} == {
        **WEBDATASET_REPORT, cut_tar: ("skipped", ["corrupt_tar"])}
    assert "path traversal" in report["00000.tar:../evil.txt"]["reason"]
    assert "not a regular file" in report["00000.tar:link.jpg"]["reason"]
    assert "'201'" in report[cut_tar]["reason"]
    assert "103.grain.json is not JSON" in report["103"]["reason"]
    assert not any(os.path.exists(p) for p in ("evil.txt", out / "evil.txt", out.parent / "evil.txt"))
    assert summary["num_examples"] == len(WEBDATASET_KEPT)


def test_webdataset_splits_by_id_hash_and_reads_back(webdataset):
    _, out, summary = webdataset
    got = {**_read(out, "train"), **_read(out, "validation")}
    assert sorted(got) == WEBDATASET_KEPT
    validation = set(_read(out, "validation"))
    assert validation == {i for i in WEBDATASET_KEPT if sources.is_validation(i, 0.5)}
    assert summary["splits"]["validation"]["num_examples"] == len(validation)
    for entry in records.read_report(out):  # bad records are reported in the split their id hashes to
        assert entry["split"] == ("validation" if sources.is_validation(entry["id"], 0.5) else "train")

    first = got["000"]
    _assert_solid(first["image"], (200, 30, 30))
    np.testing.assert_array_equal(first["caption_tokens"], _tokens("a red box")[0])
    np.testing.assert_array_equal(first["mllm_caption_tokens"], _tokens("a red rectangle")[0])
    np.testing.assert_allclose(first["boxes"][0], [.25, .5, .5, 1], atol=1e-6)
    np.testing.assert_array_equal(first["box_mask"], [True, False, False, False, False])
    # Normalised boxes (default score 1), a per-sample [width, height] canvas, side annotations.
    np.testing.assert_allclose(got["005"]["boxes"][0], [.25, .25, .5, .5], atol=1e-6)
    assert got["005"]["box_scores"][0] == 1.0
    np.testing.assert_allclose(got["007"]["boxes"][0], [.25, .25, .5, .5], atol=1e-6)
    np.testing.assert_allclose(got["100"]["boxes"][0], [.25, .5, .5, 1], atol=1e-6)
    np.testing.assert_array_equal(got["100"]["box_mask"], [True, False, False, False, False])
    np.testing.assert_allclose(got["101"]["boxes"][0], [.5, .25, 1, .5], atol=1e-6)
    np.testing.assert_array_equal(got["101"]["description_tokens"][0], _tokens("top")[0])
    np.testing.assert_array_equal(got["101"]["mllm_caption_tokens"], _tokens("side mllm")[0])
    np.testing.assert_allclose(got["102"]["boxes"][0], [.5, .75, 1, .5], atol=1e-6)  # KEY.grain.json over KEY.json
    np.testing.assert_array_equal(got["102"]["description_tokens"][0], _tokens("bottom")[0])
    np.testing.assert_array_equal(got["102"]["mllm_caption_tokens"], _tokens("beside mllm")[0])


# ------------------------------------------------------------------------------------------------
# Pieces and the command line
# ------------------------------------------------------------------------------------------------

def test_expand_braces():
    assert sources.expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert sources.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert sources.expand_braces("plain.tar") == ["plain.tar"]


def test_array_images_and_explicit_splits_through_prepare_dataset(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = 255  # right half white
    raw = {"train": [{"id": "a", "image": image, "caption": "half white", "mllm_caption": None,
                      "regions": [{"description": "white", "box": [0.5, 0, 1, 1], "score": 0.8}]}],
           "validation": [{"id": "b", "image": image, "caption": "another", "regions": []}]}
    summary = prepare.prepare_dataset(raw, tmp_path, resolution=16, max_boxes=2, context_length=10,
                                      num_workers=0, progress=False)
    assert summary["splits"]["train"]["num_examples"] == summary["splits"]["validation"]["num_examples"] == 1
    a, b = _read(tmp_path)["a"], _read(tmp_path, "validation")["b"]
    assert a["image"].shape == (16, 16, 3) and a["caption_tokens"].shape == (10,)
    assert a["image"][:, :6].mean() < 20 and a["image"][:, 10:].mean() > 235
    np.testing.assert_allclose(a["boxes"], [[.75, .5, .5, 1], [0, 0, 0, 0]], atol=1e-6)
    assert a["description_tokens"].shape == (2, 10) and not b["box_mask"].any()
    assert records.read_report(tmp_path) == []


def test_a_moved_folder_reads_and_resharding_replaces_the_old_shards(reference, tmp_path):
    root, out, _ = reference
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert list(_read(moved)) == REFERENCE_KEPT
    summary = prepare_cli.main(_reference_argv(root, moved, "--examples_per_shard", "100"))
    assert summary["splits"]["train"]["num_shards"] == 1
    assert sorted(n for n in os.listdir(moved) if ".array_record" in n) == [
        "grain_jax-train.array_record-00000-of-00001"]
    assert list(_read(moved)) == REFERENCE_KEPT
    assert sorted(os.listdir(moved / writer.WORK_DIR)) == ["train-00000.json"]  # records are stored once


def test_synthetic_command_writes_a_prepared_directory(tmp_path):
    info = prepare_cli.main(["grain-jax-prepare", "synthetic", "--output_dir", str(tmp_path / "synthetic"),
                         "--num_train", "8", "--resolution", "32", "--num_workers", "0"])
    assert info["source"] == "synthetic" and info["resolution"] == 32 and info["num_skipped"] == 0
    train = _read(tmp_path / "synthetic")
    assert len(train) == info["splits"]["train"]["num_examples"] == 8
    example = next(iter(train.values()))
    assert example["image"].shape == (32, 32, 3) and example["box_mask"].any()


def test_input_without_a_valid_record_is_an_error_with_a_full_report(tmp_path):
    raw = {"train": [{"id": "no-image", "image": None, "caption": "text"},
                     {"id": "no-caption", "image": _encoded(), "caption": ""}]}
    with pytest.raises(ValueError, match="no valid record among 2 inputs"):
        prepare.prepare_dataset(raw, tmp_path, resolution=R, num_workers=0, progress=False)
    assert {e["id"]: e["kinds"] for e in records.read_report(tmp_path)} == {
        "no-image": ["missing_image"], "no-caption": ["empty_caption"]}
    assert not os.path.exists(tmp_path / records.INFO_FILE)
