"""Reference-checkpoint conversion: outputs of the converted Flax model equal the outputs
of a PyTorch re-creation of the authors' modules (their key names, DDP ``module.``
prefixes, dead weights present), fed the same inputs."""
import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from test_convert_torch_reference import build_reference

from grain_jax import checkpoints, inference
from grain_jax.cli import convert as convert_cli
from grain_jax.convert import common, reference
from grain_jax.data import tokenizer, transforms
from grain_jax.models import create_model

MODEL = "grain-tiny"
TEXTS = ["a photo of a small red bird", "a bird which has a long beak", "x"]


def _ddp(state_dict):
    return {f"module.{k}": v for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """A train.py-style checkpoint of random reference modules, plus the modules."""
    backbone, decoder = build_reference(create_model(MODEL))
    path = tmp_path_factory.mktemp("ref") / "ep_0.pth.tar"
    optimizer = torch.optim.AdamW(list(backbone.parameters())[:2], betas=(0.9, 0.98))
    torch.save({"epoch": 0, "state_dict": _ddp(decoder.state_dict()), "backbone_state_dict": _ddp(backbone.state_dict()),
                "best_acc": 12.5, "optimizer": optimizer.state_dict(), "iteration": 7}, path)
    return str(path), backbone, decoder


@pytest.fixture(scope="module")
def converted(reference_checkpoint, tmp_path_factory):
    path, _, _ = reference_checkpoint
    output = str(tmp_path_factory.mktemp("converted"))
    convert_cli.run(["reference", "--input", path, "--output", output, "--model", MODEL])
    return output


def test_outputs_match_reference_modules(reference_checkpoint, converted):
    _, backbone, decoder = reference_checkpoint
    model = inference.load(converted)
    spec = model.spec
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, spec.image_size, spec.image_size, 3)).astype(np.float32)
    tokens = tokenizer.tokenize(TEXTS[:2], context_length=spec.caption_length)

    forward = jax.jit(lambda p, *inputs: model.model.apply({"params": p}, *inputs))
    out, aux = forward(model.params, images, tokens, tokenizer.tokenize(TEXTS, 77)[None])
    with torch.no_grad():
        vision_tokens = backbone.image_tokens(torch.from_numpy(images).permute(0, 3, 1, 2))
        layer_boxes, regions, image_embedding = decoder(vision_tokens)
        caption = backbone.encode_text(torch.from_numpy(tokens).long())
        descriptions = backbone.encode_text(torch.from_numpy(tokenizer.tokenize(TEXTS, 77)).long())
    expected = {
        "img/tokens": (aux["img/tokens"], vision_tokens),
        "img/embedding": (out["img/embedding"], image_embedding),
        "dec/boxes": (out["dec/boxes"], layer_boxes[-1]),
        "dec/layer_boxes": (out["dec/layer_boxes"], layer_boxes),
        "dec/region_embeddings": (out["dec/region_embeddings"], regions),
        "txt/caption": (out["txt/caption"], caption),
        "txt/descriptions": (out["txt/descriptions"][0], descriptions),
        "logit_scale": (out["logit_scale"], backbone.logit_scale),
    }
    for name, (ours, theirs) in expected.items():
        theirs = theirs.detach().numpy()
        assert np.asarray(ours).shape == theirs.shape, name
        scale = max(1.0, float(np.abs(theirs).max()))
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * scale, rtol=0, err_msg=name)


def test_spec_and_num_queries(converted):
    spec = checkpoints.read_model_spec(converted)
    assert spec.model_name == MODEL and spec.model_overrides == {"num_queries": 5}
    assert tuple(spec.mean) == transforms.IMAGENET_MEAN and spec.image_size == 64


def test_safetensors_input_gives_same_params(reference_checkpoint, converted, tmp_path):
    from safetensors.torch import save_file
    _, backbone, decoder = reference_checkpoint
    flat = {**{f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()},
            **{f"decoder.{k}": v.contiguous() for k, v in decoder.state_dict().items()}}
    save_file(flat, str(tmp_path / "ref.safetensors"))
    summary = reference.convert_file(str(tmp_path / "ref.safetensors"), str(tmp_path / "out"), MODEL)
    assert summary["unused"] == ["class_embed.bias", "class_embed.weight", "pos_embed", "temporal_embed",
                                 "image_projection"]
    ours = flatten_dict(checkpoints.restore_params(str(tmp_path / "out")))
    previous = flatten_dict(checkpoints.restore_params(converted))
    assert ours.keys() == previous.keys()
    for path in ours:
        np.testing.assert_array_equal(ours[path], previous[path], err_msg="/".join(path))


def test_missing_and_mismatched_keys_fail(reference_checkpoint):
    _, backbone, decoder = reference_checkpoint
    backbone_state, decoder_state = backbone.state_dict(), decoder.state_dict()
    without = {k: v for k, v in decoder_state.items() if k != "transformer.decoder.layers.1.norm3.bias"}
    with pytest.raises(common.ConversionError, match="missing key 'transformer.decoder.layers.1.norm3.bias'"):
        reference.convert_state_dicts(backbone_state, without, MODEL)
    # A model whose decoder is wider than the checkpoint's.
    with pytest.raises(common.ConversionError, match="shape mismatch|has shape"):
        params, _, model, _ = reference.convert_state_dicts(backbone_state, decoder_state, MODEL,
                                                            {"decoder_width": 64, "decoder_mlp_dim": 128})
        common.check_against_model(params, common.abstract_param_shapes(model))
    # A deeper checkpoint than the model: the extra layer is not a known dead weight.
    extra = dict(decoder_state, **{"transformer.decoder.layers.2.norm1.weight": torch.ones(128)})
    with pytest.raises(common.ConversionError, match=r"no place for: \['transformer.decoder.layers.2.norm1.weight'\]"):
        reference.convert_state_dicts(backbone_state, extra, MODEL)
    with pytest.raises(common.ConversionError, match="not a GRAIN reference checkpoint"):
        reference.split_checkpoint({"model": {}}, "x.pth")


def test_trainer_init_from_accepts_conversion(converted):
    """config.init_from loads every leaf of a converted checkpoint into a fresh model."""
    from grain_jax.train import resume
    shapes = common.abstract_param_shapes(create_model(MODEL))
    fresh = unflatten_dict({p: np.zeros(s, np.float32) for p, s in shapes.items()})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = resume.load_init_params(converted, fresh, jax.tree.map(lambda _: device, fresh))
    saved = flatten_dict(checkpoints.restore_params(converted))
    loaded = flatten_dict(params)
    assert loaded.keys() == saved.keys()
    for path in saved:
        np.testing.assert_array_equal(np.asarray(loaded[path]), saved[path], err_msg="/".join(path))


def test_clip_baseline_checkpoint(reference_checkpoint, tmp_path):
    """train_clip.py saves only 'backbone_state_dict'; its image embedding is CLS @ image_projection."""
    _, backbone, _ = reference_checkpoint
    torch.save({"epoch": 0, "backbone_state_dict": _ddp(backbone.state_dict())}, tmp_path / "clip.pth.tar")
    summary = reference.convert_file(str(tmp_path / "clip.pth.tar"), str(tmp_path / "out"), "clip-tiny")
    assert summary["unused"] == []
    model = inference.load(str(tmp_path / "out"))
    images = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    ours = jax.jit(lambda p, x: model.model.apply({"params": p}, x, method="encode_image"))(model.params, images)
    ours = ours["img/embedding"]
    with torch.no_grad():
        theirs = backbone.image_tokens(torch.from_numpy(images).permute(0, 3, 1, 2))[:, 0] @ backbone.image_projection
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)
