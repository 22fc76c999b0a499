"""Converter plumbing: safe loading, prefix stripping, layout helpers, checking."""

import numpy as np
import pytest
import torch

from grain_jax.cli import convert as convert_cli
from grain_jax.convert import common


class _CreatesFileWhenUnpickled:
    """Pickles as ``open(path, "w")``: unpickling it would create ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_callable_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"query_embed.weight": torch.zeros(2, 2)},
                "payload": _CreatesFileWhenUnpickled(str(marker))}, ckpt)
    assert not marker.exists()
    with pytest.raises(common.ConversionError, match="refusing to load"):
        common.load_checkpoint(str(ckpt))
    assert not marker.exists()
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.run(["reference", "--input", str(ckpt), "--output", str(tmp_path / "out")])
    line, = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 1 and "Nothing from it was executed." in line, line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_torchscript_needs_permission(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 3)).save(str(path))
    with pytest.raises(common.ConversionError, match="TorchScript"):
        common.load_checkpoint(str(path))
    state = common.load_checkpoint(str(path), allow_torchscript=True)
    assert sorted(state) == ["bias", "weight"] and tuple(state["weight"].shape) == (3, 2)


@pytest.mark.parametrize("name,command,reason", [
    ("fake.pt", "open_clip", "it looks like a TorchScript archive but torch.jit.load cannot read it (RuntimeError: "),
    ("pickled.safetensors", "reference", "it is not a valid .safetensors file (SafetensorError: "),
    ("pickled.safetensors", "open_clip", "it is not a valid .safetensors file (SafetensorError: "),
])
def test_fake_archives_get_the_refusal_line(tmp_path, name, command, reason, capsys):
    """A zip that only looks like TorchScript, and a pickle named .safetensors: one line, nothing run."""
    import pickle
    import zipfile
    marker, path = tmp_path / "pwned", tmp_path / name
    if name.endswith(".pt"):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/code/__torch__.py", "garbage")
            archive.writestr("model/constants.pkl", pickle.dumps(_CreatesFileWhenUnpickled(str(marker))))
    else:
        path.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(str(marker))))
    extra = ["--arch", "ViT-B-16"] if command == "open_clip" else []
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.run([command, "--input", str(path), "--output", str(tmp_path / "out"), *extra])
    message, = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 1
    assert message.startswith(f"grain-jax-convert: error: refusing to load {path}: {reason}"), message
    assert message.endswith("Nothing from it was executed."), message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_plain_and_safetensors_checkpoints_load(tmp_path):
    from safetensors.torch import save_file
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    torch.save({"state_dict": tensors, "epoch": 3, "best_acc": 1.5, "betas": (0.9, 0.98)}, tmp_path / "x.pth.tar")
    save_file(tensors, str(tmp_path / "x.safetensors"))
    loaded = common.load_checkpoint(str(tmp_path / "x.pth.tar"))
    assert loaded["epoch"] == 3 and loaded["betas"] == (0.9, 0.98)
    from_st = common.state_dict_arrays(common.load_checkpoint(str(tmp_path / "x.safetensors")))
    np.testing.assert_array_equal(from_st["a.weight"], np.arange(6.0).reshape(2, 3))
    assert from_st["b"].dtype == np.float32  # fp16 widened


def test_module_prefix_stripped_and_unused_reported():
    arrays = common.state_dict_arrays({"module.x": torch.ones(2), "module.dead": torch.zeros(1), "y": torch.ones(1)})
    assert sorted(arrays) == ["dead", "x", "y"]
    source = common.TensorSource(arrays, "decoder")
    source.take("x", (2,))
    source.take("y")
    with pytest.raises(common.ConversionError, match="'x' has shape"):
        source.take("x", (3,))
    with pytest.raises(common.ConversionError, match="missing key 'z'"):
        source.take("z")
    assert common.report_unused(source, common.matches_any(["dead"])) == ["dead"]
    with pytest.raises(common.ConversionError, match=r"no place for: \['dead'\]"):
        common.report_unused(source, common.matches_any(["other"]))
    with pytest.raises(common.ConversionError, match="both with and without"):
        common.state_dict_arrays({"module.x": torch.ones(1), "x": torch.ones(1)})


def test_layout_helpers_match_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    linear = torch.nn.Linear(5, 4)
    np.testing.assert_allclose(x @ common.linear_kernel(linear.weight.detach().numpy()) + linear.bias.detach().numpy(),
                               linear(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    conv = torch.nn.Conv2d(3, 6, kernel_size=2, stride=2, bias=False)
    image = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    kernel = common.conv_kernel(conv.weight.detach().numpy())  # [kh, kw, in, out]
    patches = image[0].transpose(1, 2, 0).reshape(2, 2, 2, 2, 3).transpose(0, 2, 1, 3, 4)  # [gh, gw, kh, kw, in]
    ours = np.einsum("abhwi,hwio->abo", patches, kernel)
    np.testing.assert_allclose(ours, conv(torch.from_numpy(image))[0].detach().numpy().transpose(1, 2, 0), atol=1e-5)


def test_check_against_model_names_every_problem():
    expected = {("a", "kernel"): (2, 3), ("a", "bias"): (3,), ("b", "scale"): (4,)}
    good = {"a": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}, "b": {"scale": np.zeros(4)}}
    common.check_against_model(good, expected)
    bad = {"a": {"kernel": np.zeros((3, 2))}, "c": {"x": np.zeros(1)}}
    with pytest.raises(common.ConversionError) as info:
        common.check_against_model(bad, expected)
    message = str(info.value)
    assert "missing" in message and "a/bias" in message and "b/scale" in message
    assert "unexpected" in message and "c/x" in message
    assert "shape mismatch at a/kernel" in message
