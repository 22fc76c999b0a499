"""Bad config values stop the trainer before any data, model or compile, with a message naming the key.

(No wall-clock assertions: "before anything is built" is checked by what was not written.)
"""
import os
import subprocess

import pytest

import _train_utils
from grain_jax.train import trainer

BAD_VALUES = [
    ({"lr": -1.0}, "config.lr must be a finite number in (0, inf), got -1.0"),
    ({"lr": 0.0}, "config.lr must be a finite number in (0, inf), got 0.0"),
    ({"lr": float("nan")}, "config.lr must be a finite number in (0, inf), got nan"),
    ({"lr_start": float("inf")}, "config.lr_start must be a finite number in [0, inf), got inf"),
    ({"lr_end": -1e-5}, "config.lr_end must be a finite number in [0, inf), got -1e-05"),
    ({"weight_decay": -0.1}, "config.weight_decay must be a finite number in [0, inf), got -0.1"),
    ({"adam.b1": 1.0}, "config.adam.b1 must be a finite number in [0, 1), got 1.0"),
    ({"adam.b2": -0.5}, "config.adam.b2 must be a finite number in [0, 1), got -0.5"),
    ({"adam.eps": 0.0}, "config.adam.eps must be a finite number in (0, inf), got 0.0"),
    ({"grad_clip_norm": -1.0}, "config.grad_clip_norm must be a finite number in (0, inf), got -1.0"),
    ({"loss.box_l1": -1.0}, "config.loss.box_l1 must be a finite number in [0, inf), got -1.0"),
    ({"loss.box_factor": float("nan")}, "config.loss.box_factor must be a finite number in [0, inf), got nan"),
    ({"loss.image_caption": -2.0}, "config.loss.image_caption must be a finite number in [0, inf), got -2.0"),
    ({"model.decoder_dropout": 1.0}, "config.model.decoder_dropout must be a finite number in [0, 1), got 1.0"),
    ({"data.image_size": 0}, "config.data.image_size must be a positive integer, got 0"),
    ({"data.image_size": 60}, "config.data.image_size=60 must be a multiple of the patch size 8"),
    ({"data.caption_length": 100}, "config.data.caption_length must be an integer in 1..77"),
    ({"data.description_length": 0}, "config.data.description_length must be an integer in 1..77"),
    ({"model.context_length": 100}, "config.model.context_length must be in 1..77"),
    ({"data.text_length_buckets": (1, 16)}, "config.data.text_length_buckets must be token lengths >= 2"),
    ({"data.std": (0.2, 0.0, 0.2)}, "config.data.std[1] must be a finite number in (0, inf), got 0.0"),
    ({"mesh_shape": "abc"}, "config.mesh_shape must be 3 integers (data, fsdp, tensor)"),
    ({"mesh_shape": (2, 0, 1)}, "config.mesh_shape must be 3 integers (data, fsdp, tensor)"),
    ({"mesh_shape": (1, 2)}, "config.mesh_shape must be 3 integers (data, fsdp, tensor)"),
    ({"dtype": "float17"}, "config.dtype must be one of ['bfloat16', 'float16', 'float32'], got 'float17'"),
    ({"param_dtype": "int8"}, "config.param_dtype must be one of ['bfloat16', 'float32'], got 'int8'"),
    ({"grad_reduce_dtype": "bfloat16"}, "config.grad_reduce_dtype must be one of ['compute', 'float32'], got 'bfloat16'"),
    ({"grad_reduce_dtype": "float32", "param_dtype": "bfloat16"},
     "config.grad_reduce_dtype='float32' needs config.param_dtype='float32'"),
    ({"warmup_steps": 20}, "config.warmup_steps (20 steps) must be <= config.total_steps (12 steps)"),
    ({"profile_steps": (5, 5)}, "config.profile_steps must be (start, stop) with 0 <= start < stop"),
    ({"profile_steps": (-1, 3)}, "config.profile_steps must be (start, stop) with 0 <= start < stop"),
]


def _set(config, key, value):
    *sections, last = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    with node.ignore_type():
        node[last] = value


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[next(iter(o)) + "=" + repr(next(iter(o.values())))
                                                               for o, _ in BAD_VALUES])
def test_bad_value_is_refused_naming_the_key_before_building(tmp_path, data_cache, overrides, message):
    config = _train_utils.runlocal_config(data_cache)
    for key, value in overrides.items():
        _set(config, key, value)
    with pytest.raises(ValueError) as error:
        trainer.train_and_evaluate(config, str(tmp_path))
    assert message in str(error.value)
    # Nothing was built: no model description written, no checkpoint directory.
    assert not os.path.exists(tmp_path / "model_config.json") and not os.path.exists(tmp_path / "checkpoints")


def test_several_bad_values_are_reported_together(tmp_path, data_cache):
    config = _train_utils.runlocal_config(data_cache, lr=-1.0, weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"config\.lr must .*; config\.weight_decay must"):
        trainer.validate_config(config)


def test_binary_refuses_negative_lr_before_compiling(tmp_path, data_cache):
    result = subprocess.run(_train_utils.cli(str(tmp_path), data_cache, "--config.lr=-1"), cwd=_train_utils.REPO,
                            env=_train_utils.subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config.lr must be a finite number in (0, inf), got -1.0" in result.stdout + result.stderr
    assert "compiled train step" not in result.stdout + result.stderr
    assert not os.path.exists(tmp_path / "model_config.json")
