"""grain-jax-annotate: the MLLM client against a local fake OpenAI server, resume after kill -9, end to end."""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import _train_utils
from fake_openai import MODEL, FakeServer, canned, image_key
from grain_jax.annotate import mllm
from grain_jax.cli import annotate as cli
from grain_jax.cli import console
from grain_jax.cli import prepare as prepare_cli
from grain_jax.data import records, synthetic


def _png(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _client(url, prompt="regions", **overrides):
    config = mllm.ClientConfig(api_base=url, model=MODEL, concurrency=3, timeout_s=0.5, max_retries=3,
                               backoff_s=0.01, **overrides)
    return config, mllm.Prompt.load(prompt)


def test_parse_answer():
    assert mllm.parse_answer("Here you go:\n- a red wing\n* the beak\n1. long tail\n2) •\n", "list") == [
        "a red wing", "the beak", "long tail"]
    assert mllm.parse_answer("  A dog\n on a beach. ", "text") == "A dog on a beach."
    for text, kind in (("", "empty_answer"), (None, "empty_answer"), ("I'm sorry, I can't.", "refused"),
                       ("A dog on a beach.", "not_a_list")):
        with pytest.raises(mllm.AnswerError) as e:
            mllm.parse_answer(text, "list")
        assert e.value.kind == kind


def test_client_retries_and_reports_bad_answers(tmp_path):
    images = [_png(i) for i in range(8)]
    keys = [image_key(b) for b in images]
    script = {keys[0]: ["429", "500"], keys[1]: ["timeout"], keys[2]: ["malformed"], keys[3]: ["empty"],
              keys[4]: ["refuse"], keys[5]: ["paragraph"], keys[7]: ["500"] * 10}
    items = [(f"img{i}.png", lambda b=b: b) for i, b in enumerate(images)]
    items.append(("broken.png", lambda: b"not an image"))
    with FakeServer(script, timeout_s=1.5) as server:
        config, prompt = _client(server.url)
        records, usage = mllm.describe(items, str(tmp_path / "regions"), config, prompt, shard_size=4,
                                       show_progress=False)
    for i in (0, 1, 2, 6):
        assert records[f"img{i}.png"]["ok"] and records[f"img{i}.png"]["value"] == mllm.parse_answer(
            canned(keys[i], True), "list")
    assert {k: (r["error"] if not r["ok"] else "ok") for k, r in records.items() if k[3] in "34578" or k[0] == "b"} \
        == {"img3.png": "empty_answer", "img4.png": "refused", "img5.png": "not_a_list", "img7.png": "http_5xx",
            "broken.png": "unreadable_image"}
    assert "after 4 attempts" in records["img7.png"]["detail"]
    assert server.calls[keys[0]] == 3 and server.calls[keys[1]] == 2 and server.calls[keys[7]] == 4
    assert usage.retries == 2 + 1 + 1 + 3
    assert usage.requests == 6 + 1 and usage.prompt_tokens >= 7 * 1000  # refusal-free answers + the 3 content ones
    shards = sorted(os.listdir(tmp_path / "regions"))
    assert shards == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]

    # A rerun asks again only for the transient failure (img7), and now it succeeds.
    with FakeServer() as server:
        config, prompt = _client(server.url)
        records, _ = mllm.describe(items, str(tmp_path / "regions"), config, prompt, shard_size=4,
                                   show_progress=False)
    assert server.calls == {keys[7]: 1} and records["img7.png"]["ok"]


@pytest.mark.parametrize("url_suffix,model,message", [
    ("", "no-such-model", "model 'no-such-model'.*HTTP 404.*does not exist.*check --api_base"),
    ("/wrong", MODEL, "/wrong/chat/completions.*HTTP 404.*no route"),
])
def test_wrong_endpoint_or_model_fails_at_the_first_request(tmp_path, url_suffix, model, message):
    items = [(f"img{i}.png", lambda i=i: _png(i)) for i in range(5)]
    with FakeServer() as server:
        config, prompt = _client(server.url + url_suffix)
        config.model = model
        with pytest.raises(mllm.SetupError, match=message):
            mllm.describe(items, str(tmp_path / "regions"), config, prompt, show_progress=False)
        assert sum(server.calls.values()) == 0  # refused before reaching an image


def test_unreachable_server_is_a_setup_error(tmp_path):
    config, prompt = _client("http://127.0.0.1:9/v1")
    with pytest.raises(mllm.SetupError, match="cannot reach http://127.0.0.1:9/v1/chat/completions"):
        mllm.describe([("a.png", lambda: _png(0))], str(tmp_path), config, prompt, show_progress=False)


def _image_folder(root, count: int) -> str:
    """Synthetic-benchmark scenes as PNG files + a captions CSV (header row, like the reference's)."""
    os.makedirs(root / "images", exist_ok=True)
    rows = [["image_path", "caption"]]
    for scene in synthetic.generate_scenes("train", 0, count, resolution=64):
        path = f"{scene.id}.png"
        Image.fromarray(scene.image).save(root / "images" / path)
        rows.append([path, scene.caption])
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(root)


def _annotate_command(root, out, url, *extra):
    return [sys.executable, "-m", "grain_jax.cli.annotate", "--images", f"{root}/images", "--captions",
            f"{root}/captions.csv", "--output", str(out), "--api_base", url, "--model", MODEL, "--concurrency", "2",
            "--backoff", "0.01", "--shard_size", "5", "--no_progress", *extra]


def test_resume_after_kill_gives_the_uninterrupted_output(tmp_path):
    root = _image_folder(tmp_path, 12)
    env = _train_utils.subprocess_env()
    with FakeServer(delay_s=0.15) as server:
        subprocess.run(_annotate_command(root, tmp_path / "whole", server.url, "--skip_detect"), env=env,
                       check=True, capture_output=True)
        whole_calls = sum(server.calls.values())
        server.calls.clear()
        killed = subprocess.Popen(_annotate_command(root, tmp_path / "killed", server.url, "--skip_detect"), env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        work = tmp_path / "killed" / "work" / "regions"
        deadline = time.time() + 60
        while time.time() < deadline:
            answered = sum(len(open(work / f).read().splitlines()) for f in os.listdir(work)) if work.exists() else 0
            if answered >= 4:
                break
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert 4 <= answered < 12
        subprocess.run(_annotate_command(root, tmp_path / "killed", server.url, "--skip_detect"), env=env,
                       check=True, capture_output=True)
        # At most the requests in flight at the kill (concurrency 2) are asked twice.
        assert whole_calls == 24 and 24 <= sum(server.calls.values()) <= 24 + 2
    for name in ("captions_pooled.csv", "captions_cc12m_pooled.json", "descriptions.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    descriptions = json.loads((tmp_path / "whole" / "descriptions.json").read_text())
    assert len(descriptions) == 12 and all(len(v) == 3 for v in descriptions.values())


def test_end_to_end_annotate_prepare_train(tmp_path):
    from owlv2_fakes import save_tiny_owlv2

    from grain_jax.train import trainer

    root = _image_folder(tmp_path, 10)
    with open(os.path.join(root, "images", "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG broken")
    with open(os.path.join(root, "captions.csv"), "a", newline="") as f:
        csv.writer(f).writerow(["corrupt.png", "a broken file"])
    detector = save_tiny_owlv2(str(tmp_path / "owlv2"))
    out = tmp_path / "annotated"
    names = sorted(os.listdir(os.path.join(root, "images")))
    key = {name: image_key(open(os.path.join(root, "images", name), "rb").read()) for name in names}
    with FakeServer({key[names[3]]: ["paragraph"], key[names[4]]: ["long"]}) as server:
        summary = cli.main(_annotate_command(root, out, server.url, "--detector", detector, "--threshold", "0.35",
                                             "--squash_size", "16")[2:])
    report = [json.loads(line) for line in open(out / "annotate_report.jsonl")]
    kinds = {(r["id"], r["stage"], r["kind"]) for r in report}
    assert ("corrupt.png", "describe", "unreadable_image") in kinds and ("corrupt.png", "caption",
                                                                         "unreadable_image") in kinds
    assert (names[3], "describe", "not_a_list") in kinds and (names[4], "detect", "description_truncated") in kinds
    assert summary["images"] == 11 and summary["images_with_descriptions"] == 9
    assert summary["threshold"] == 0.35 and sum(summary["boxes_per_image_histogram"].values()) == 9
    boxes = json.loads((out / "bboxes_cc12m_pooled.json").read_text())
    assert set(boxes) == set(json.loads((out / "descriptions.json").read_text()))
    assert summary["images_with_boxes"] > 0
    for regions in boxes.values():
        for r in regions:
            assert r["score"] > 0.35 and len(r["bbox"]) == 4 and r["description"] != "<pad>"

    prepared = tmp_path / "prepared"
    subprocess.run([sys.executable, "-m", "grain_jax.cli.prepare", "reference", "--captions",
                    str(out / "captions_pooled.csv"), "--mllm_captions", str(out / "captions_cc12m_pooled.json"),
                    "--boxes", str(out / "bboxes_cc12m_pooled.json"), "--images_root", f"{root}/images",
                    "--output_dir", str(prepared), "--resolution", "32", "--validation_fraction", "0",
                    "--num_workers", "1"], env=_train_utils.subprocess_env(), check=True, capture_output=True)
    info = json.loads((prepared / "grain_jax_info.json").read_text())
    assert info["splits"]["train"]["num_examples"] == 10, info
    config = _train_utils.runlocal_config(str(tmp_path / "cache"))
    config.data.dir = str(prepared)
    trainer.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert os.path.isdir(tmp_path / "workdir" / "checkpoints")


def _write_tar(path, members) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_webdataset_input_writes_annotations_prepare_reads(tmp_path):
    from grain_jax.data.prepare import sources as prepare

    shard = _write_tar(tmp_path / "00000.tar", [("a.png", _png(1)), ("a.txt", b"first"), ("b.png", _png(2)),
                                                ("b.txt", b"second"), ("c.txt", b"no image")])
    with FakeServer() as server:
        summary = cli.main(["grain-jax-annotate", "--shards", shard, "--output", str(tmp_path / "out"),
                            "--api_base", server.url,
                            "--model", MODEL, "--skip_detect", "--no_progress"])
    assert summary["images"] == 2 and summary["problems"] == {"missing_image": 1}
    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert annotations["a"] == {"regions": [], "mllm_caption": canned(image_key(_png(1)), False), "canvas": 960.0}
    examples = list(prepare.webdataset_raw_splits(shard, str(tmp_path / "out" / "annotations.json"),
                                                  validation_fraction=0)["train"])
    assert [(e["id"], e["caption"], e["mllm_caption"]) for e in examples] == [
        ("a", b"first", annotations["a"]["mllm_caption"]), ("b", b"second", annotations["b"]["mllm_caption"]),
        ("c", b"no image", None)]


def _webdataset_input(root) -> str:
    """Two tars of synthetic scenes; c has no image, d a KEY.json that is not JSON, f a stale KEY.grain.json."""
    scenes = synthetic.generate_scenes("train", 0, 5, resolution=64)

    def png(i):
        buffer = io.BytesIO()
        Image.fromarray(scenes[i].image).save(buffer, "PNG")
        return buffer.getvalue()

    def caption(i):
        return scenes[i].caption.encode()

    _write_tar(root / "00000.tar", [
        ("a.png", png(0)), ("a.txt", caption(0)), ("a.json", b'{"url": "http://example.com/a.png"}'),
        ("b.png", png(1)), ("b.txt", caption(1)), ("c.txt", b"no image"),
        ("d.png", png(2)), ("d.txt", caption(2)), ("d.json", b"{not json")])
    _write_tar(root / "00001.tar", [("e.png", png(3)), ("e.txt", caption(3)), ("f.png", png(4)),
                                    ("f.txt", caption(4)), ("f.grain.json", b"{stale")])
    return f"{root}/{{00000..00001}}.tar"


def _annotate_shards(shards, out, url, *extra) -> dict:
    return cli.main(["grain-jax-annotate", "--shards", shards, "--output", str(out), "--api_base", url, "--model", MODEL, "--no_progress",
                     *extra])


def _prepare_webdataset(shards, out, *extra) -> dict[str, bytes]:
    """The prepared records and report, as bytes by file name."""
    prepare_cli.main(["grain-jax-prepare", "webdataset", "--shards", shards, "--output_dir", str(out),
                      "--resolution", "32", "--num_workers", "0", "--validation_fraction", "0", *extra])
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))
            if ".array_record-" in name or name == records.REPORT_FILE}


def test_webdataset_output_prepares_like_the_side_file(tmp_path):
    from owlv2_fakes import save_tiny_owlv2

    shards = _webdataset_input(tmp_path)
    detector = save_tiny_owlv2(str(tmp_path / "owlv2"))
    out = tmp_path / "annotated"
    detect = ["--detector", detector, "--threshold", "0.35", "--squash_size", "16"]
    with FakeServer() as server:
        side = _annotate_shards(shards, out, server.url, *detect)
        server.calls.clear()
        beside = _annotate_shards(shards, out, server.url, *detect, "--output_format", "webdataset")
        assert server.calls == {}  # the second format is written from the first run's work files
    report = [json.loads(line) for line in open(out / "annotate_report.jsonl")]
    assert {(r["id"], r["stage"], r["kind"]) for r in report} >= {("c", "input", "missing_image"),
                                                                 ("d", "input", "corrupt_sample_json")}
    assert next(r["detail"] for r in report if r["id"] == "d").startswith("d.json is not JSON: ")
    assert beside["output_shards"] == {"written": 2, "kept": 0}
    assert {k: v for k, v in beside.items() if k not in ("output_shards", "usage")} == {
        k: v for k, v in side.items() if k != "usage"}
    assert side["images"] == 4 and side["images_with_boxes"] > 0

    annotations = json.loads((out / "annotations.json").read_text())
    assert sorted(annotations) == ["a", "b", "e", "f"]
    with tarfile.open(out / "webdataset" / "00000.tar") as tar:
        assert tar.getnames() == ["a.png", "a.txt", "a.json", "a.grain.json", "b.png", "b.txt", "b.grain.json",
                                  "c.txt", "d.png", "d.txt", "d.json"]
        assert json.load(tar.extractfile("a.grain.json")) == annotations["a"]
    with tarfile.open(out / "webdataset" / "00001.tar") as tar:
        assert tar.getnames() == ["e.png", "e.txt", "e.grain.json", "f.png", "f.txt", "f.grain.json"]
        assert json.load(tar.extractfile("f.grain.json")) == annotations["f"]

    from_side = _prepare_webdataset(shards, tmp_path / "from_side", "--annotations", str(out / "annotations.json"))
    from_shards = _prepare_webdataset(f"{out}/webdataset/{{00000..00001}}.tar", tmp_path / "from_shards")
    assert from_shards == from_side
    skipped = {e["id"]: e["kinds"] for e in records.read_report(tmp_path / "from_shards") if e["action"] == "skipped"}
    assert skipped == {"c": ["missing_image"], "d": ["corrupt_sample_json"]}


def test_webdataset_output_resumes_by_tar_and_parts_by_tar(tmp_path):
    shards = _webdataset_input(tmp_path)
    out, written = tmp_path / "annotated", tmp_path / "annotated" / "webdataset"
    with FakeServer() as server:
        first = _annotate_shards(shards, out, server.url, "--skip_detect", "--output_format", "webdataset")
        second_tar = (written / "00001.tar").read_bytes()
        (written / "00000.tar").write_bytes(b"finished")  # a finished tar is kept as it is
        os.remove(written / "00001.tar")
        (written / "00001.tar.tmp").write_bytes(b"cut short by a kill")
        server.calls.clear()
        again = _annotate_shards(shards, out, server.url, "--skip_detect", "--output_format", "webdataset")
        assert server.calls == {}
        part = _annotate_shards(shards, tmp_path / "part1", server.url, "--skip_detect", "--output_format",
                                "webdataset", "--part", "1/2")
    assert first["output_shards"] == {"written": 2, "kept": 0} and again["output_shards"] == {"written": 1, "kept": 1}
    assert sorted(os.listdir(written)) == ["00000.tar", "00001.tar"]
    assert (written / "00000.tar").read_bytes() == b"finished" and (written / "00001.tar").read_bytes() == second_tar
    assert part["images"] == 2 and part["output_shards"] == {"written": 1, "kept": 0}
    assert os.listdir(tmp_path / "part1" / "webdataset") == ["00001.tar"]
    assert (tmp_path / "part1" / "webdataset" / "00001.tar").read_bytes() == second_tar


def test_webdataset_output_needs_webdataset_input(tmp_path):
    root = _image_folder(tmp_path, 1)
    with pytest.raises(console.UsageError, match="--output_format webdataset needs --shards"):
        cli.main(["grain-jax-annotate", *_annotate_command(root, tmp_path / "out", "http://127.0.0.1:9/v1",
                                                           "--skip_detect", "--output_format", "webdataset")[3:]])
