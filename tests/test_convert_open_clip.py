"""open_clip / OpenAI CLIP conversion: image and text embeddings of the converted model
equal open_clip's (random weights, fixed inputs), tokenizer ids equal open_clip's."""
import json

import jax
import numpy as np
import open_clip
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from test_convert_torch_reference import randomize_

from grain_jax import checkpoints, inference
from grain_jax.cli import convert as convert_cli
from grain_jax.convert import common
from grain_jax.convert import open_clip as converter
from grain_jax.data import tokenizer

TINY_ARCH = "grain-test-tiny-quickgelu"
TINY_CONFIG = {"embed_dim": 128, "quick_gelu": True,
               "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}
TEXTS = ["a photo of a cat", "A Photo Of A CAT!!", "", "naïve café &amp; crème brûlée", "it's 3:45pm, isn't it?",
         "emoji 🐦 bird", "  lots   of\twhitespace\n here ", "word " * 100]


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("open_clip_configs")
    (config_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config_dir))
    return TINY_ARCH


def _our_embeddings(model, params, batch, texts):
    """Our (image [B, E], text [T, E]) embeddings on fixed random pixels, plus the inputs."""
    size = model.image_size
    images = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)
    tokens = tokenizer.tokenize(texts, context_length=model.context_length)
    encode = jax.jit(lambda p, x, t: (model.apply({"params": p}, x, method="encode_image")["img/embedding"],
                                      model.apply({"params": p}, t, method="encode_text")))
    image, text = encode(params, images, tokens)
    return np.asarray(image), np.asarray(text), images, tokens


def _open_clip_outputs(model, images, tokens):
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        text = model.encode_text(torch.from_numpy(tokens).long()).numpy()
    return image, text


@pytest.fixture(scope="module")
def tiny_model(tiny_arch):
    model = open_clip.create_model(tiny_arch, pretrained=None).eval()
    randomize_(model, seed=5, scale=0.1)  # every weight random: zero biases would hide mapping errors
    return model


def test_tiny_config_parity(tiny_arch, tiny_model, tmp_path):
    """Through the CLI, from an open_clip training-style checkpoint (state dict under
    'state_dict', DDP prefixes), then grain_jax.inference.load."""
    model = tiny_model
    torch.save({"epoch": 3, "name": tiny_arch, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    convert_cli.run(["open_clip", "--input", str(tmp_path / "epoch_3.pt"), "--arch", tiny_arch, "--output", str(tmp_path / "out")])
    ours = inference.load(str(tmp_path / "out"))
    our_image, our_text, images, tokens = _our_embeddings(ours.model, ours.params, 3, TEXTS)
    image, text = _open_clip_outputs(model, images, tokens)
    np.testing.assert_allclose(our_image, image, atol=1e-4, rtol=0)
    np.testing.assert_allclose(our_text, text, atol=1e-4, rtol=0)
    assert ours.spec.model_overrides["vit_variant"] == "Mu/8" and tuple(ours.spec.mean) == converter.OPENAI_MEAN
    assert ours.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)


def test_torchscript_archive_converts_like_the_state_dict(tiny_arch, tiny_model, tmp_path):
    """OpenAI ships TorchScript archives; one (traced here) converts to the same params."""
    example = (torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long))
    torch.jit.trace(tiny_model, example, check_trace=False).save(str(tmp_path / "scripted.pt"))
    summary = converter.convert_file(str(tmp_path / "scripted.pt"), str(tmp_path / "out"), tiny_arch)
    assert summary["unused"] == ["attn_mask"]
    assert checkpoints.read_model_spec(str(tmp_path / "out")).create_model().vit_activation == "quick_gelu"
    scripted = checkpoints.restore_params(str(tmp_path / "out"))
    plain, _, _, _ = converter.convert_state_dict(tiny_model.state_dict(), tiny_arch)
    scripted, plain = flatten_dict(scripted), flatten_dict(plain)
    assert scripted.keys() == plain.keys()
    for path in plain:
        np.testing.assert_array_equal(scripted[path], plain[path], err_msg="/".join(path))


def test_vit_b16_parity(tmp_path):
    """open_clip's ViT-B-16 (exact GELU in both towers), from a .safetensors file; converted in
    memory (the tiny test covers writing and loading the checkpoint; it is QuickGELU like OpenAI's)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "b16.safetensors"))
    state = common.load_checkpoint(str(tmp_path / "b16.safetensors"))
    params, spec, ours, unused = converter.convert_state_dict(state, "ViT-B-16")
    common.check_against_model(params, common.abstract_param_shapes(ours))
    our_image, our_text, images, tokens = _our_embeddings(ours, params, 1, TEXTS[:2])
    image, text = _open_clip_outputs(model, images, tokens)
    print(f"ViT-B-16 max |diff|: image {np.abs(our_image - image).max():.2e}, text {np.abs(our_text - text).max():.2e}")
    np.testing.assert_allclose(our_image, image, atol=1e-4, rtol=0)
    np.testing.assert_allclose(our_text, text, atol=1e-4, rtol=0)
    assert spec.model_name == "clip-vit-b16-openai" and unused == []
    assert spec.model_overrides == {"vit_activation": "gelu", "text_activation": "gelu"}


def test_tokenizer_ids_equal_open_clip():
    np.testing.assert_array_equal(tokenizer.tokenize(TEXTS, context_length=77), open_clip.tokenize(TEXTS).numpy())


def test_unsupported_and_mismatched_inputs_fail(tiny_arch):
    model = open_clip.create_model(tiny_arch, pretrained=None)
    state = model.state_dict()
    with pytest.raises(common.ConversionError, match="missing key 'visual.ln_pre.bias'"):
        converter.convert_state_dict({k: v for k, v in state.items() if k != "visual.ln_pre.bias"}, tiny_arch)
    with pytest.raises(common.ConversionError, match=r"no place for: \['logit_bias'\]"):
        converter.convert_state_dict(dict(state, logit_bias=torch.zeros(())), tiny_arch)
    with pytest.raises(common.ConversionError, match="ViT-H-14: no grain_jax ViT variant"):
        converter.model_for_arch("ViT-H-14")
    with pytest.raises(common.ConversionError, match="do not implement"):
        converter.model_for_arch("ViT-B-16-SigLIP")



def test_grain_init_from_clip_towers(tiny_arch, tiny_model, tmp_path):
    """The trainer's init_from starts a GRAIN model (OpenAI-style ViT options) from converted CLIP
    towers: towers loaded, the decoder kept fresh (dont_load), the CLIP-only image_projection ignored."""
    from flax import traverse_util

    from grain_jax.models import OPENAI_VIT, create_model
    from grain_jax.train import resume
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.pt")
    converted = str(tmp_path / "converted")
    converter.convert_file(str(tmp_path / "tiny.pt"), converted, tiny_arch)
    clip_model = checkpoints.read_model_spec(converted).create_model()
    towers = ("vit_variant", "image_size", "embed_dim", "text_width", "text_heads", "text_layers", *OPENAI_VIT)
    grain = create_model("grain-tiny", **{k: getattr(clip_model, k) for k in towers})
    fresh = unflatten_dict({p: np.full(s, 7.0, np.float32) for p, s in common.abstract_param_shapes(grain).items()})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = resume.load_init_params(converted, fresh, jax.tree.map(lambda _: device, fresh),
                                            dont_load=["decoder/.*"])
    saved = traverse_util.flatten_dict(checkpoints.restore_params(converted))
    for path, value in flatten_dict(params).items():
        if path[0] == "decoder":
            assert np.all(np.asarray(value) == 7.0), path
        else:
            np.testing.assert_array_equal(np.asarray(value), saved[path], err_msg="/".join(path))
