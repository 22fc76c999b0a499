"""OWLv2 in Flax vs transformers' Owlv2ForObjectDetection on a tiny random config (no download)."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from grain_jax import sharding
from grain_jax.annotate import detect
from grain_jax.convert import common, owlv2 as convert_owlv2
from grain_jax.models import owlv2
from owlv2_fakes import save_tiny_owlv2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_owlv2(str(tmp_path_factory.mktemp("owlv2")))


def _inputs(batch=2, queries=3):
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
    texts = ["a red wing", "the beak", "<pad>", "x", "a long tail feather on a bird", "stripes"][:batch * queries]
    tokens, _ = detect.tokenize_queries(texts, 16)
    tokens[-1] = 0  # one all-padding query: masked
    return pixels, tokens.reshape(batch, queries, 16)


def test_parity_with_transformers(tiny_dir):
    config, params = convert_owlv2.load_transformers_dir(tiny_dir)
    pixels, tokens = _inputs()
    model = transformers.Owlv2ForObjectDetection.from_pretrained(tiny_dir).eval()
    ids = torch.from_numpy(tokens.reshape(-1, 16).astype(np.int64))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=torch.from_numpy(pixels), attention_mask=(ids > 0).long())
    ours = owlv2.OwlV2(config).apply({"params": params}, pixels.transpose(0, 2, 3, 1), tokens)
    np.testing.assert_allclose(ours["boxes"], ref.pred_boxes.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours["objectness"], ref.objectness_logits.numpy(), atol=1e-4)
    valid = tokens[..., 0] > 0
    np.testing.assert_allclose(np.asarray(ours["logits"])[:, :, valid[0]][0], ref.logits.numpy()[0][:, valid[0]],
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours["logits"])[1][:, valid[1]], ref.logits.numpy()[1][:, valid[1]],
                               atol=1e-4)
    assert (np.asarray(ours["logits"])[1][:, ~valid[1]] == np.finfo(np.float32).min).all()
    assert np.ptp(ref.pred_boxes.numpy()) > 0.1 and np.ptp(ref.logits.numpy()[0]) > 0.01  # not degenerate


def test_converter_rejects_wrong_checkpoints(tiny_dir):
    from safetensors.numpy import load_file
    config = owlv2.OwlV2Config.from_transformers(json.load(open(os.path.join(tiny_dir, "config.json"))))
    state = load_file(os.path.join(tiny_dir, "model.safetensors"))
    broken = {k: v for k, v in state.items() if k != "box_head.dense1.bias"}
    with pytest.raises(common.ConversionError, match="missing key 'box_head.dense1.bias'"):
        convert_owlv2.convert_state_dict(broken, config)
    with pytest.raises(common.ConversionError, match="keys the model has no place for: \\['extra.weight'\\]"):
        convert_owlv2.convert_state_dict({**state, "extra.weight": np.zeros(3, np.float32)}, config)


def test_jax_detector_matches_torch_detector_and_sharding(tiny_dir):
    rng = np.random.default_rng(1)
    # Squashed smaller than the detector input (32), as 224 -> 960 in the protocol: both resize by upsampling.
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    queries = [detect.make_queries(["- red wing", "beak", "*tail"], 10) for _ in range(5)]
    tokens = np.stack([detect.tokenize_queries(q, 16)[0] for q in queries])
    protocol = detect.Protocol(squash_size=16, threshold=0.5)
    config, params = convert_owlv2.load_transformers_dir(tiny_dir)
    sharded = detect.JaxDetector(config, params, protocol, batch_size=8)
    assert sharded.mesh.devices.size == 8
    single = detect.JaxDetector(config, params, protocol, batch_size=2,
                                mesh=sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1]))
    torch_det = detect.TorchDetector(tiny_dir, protocol, batch_size=2)
    a, b, c = sharded.raw(images, tokens), single.raw(images, tokens), torch_det.raw(images, tokens)
    for x, y, z, scale in zip(a, b, c, (1, 1, protocol.box_canvas)):  # boxes on the 960-px canvas
        np.testing.assert_allclose(x / scale, y / scale, atol=1e-5)
        np.testing.assert_allclose(x / scale, z / scale, atol=1e-4)
    kept = [detect.detections(*(r[i] for r in a), queries[i], protocol.threshold) for i in range(5)]
    assert sum(map(len, kept)) > 0 and all(d["description"] in ("red wing", "beak", "tail") for k in kept for d in k)
