"""Every config file with every documented argument loads and validates; the binary rejects unknown keys."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

import _train_utils
from grain_jax.losses import LossConfig
from grain_jax.models import list_models
from grain_jax.train import optimizer, trainer

CONFIGS = os.path.join(_train_utils.REPO, "grain_jax", "configs")
VARIANTS = ["variant=S/16", "variant=B/16", "variant=L/14", "runlocal", "variant=L/14,runlocal"]
ABLATION_BASES = ["", "dataset=cc3m", "variant=S/16,runlocal", "dataset=demo", "dataset=demo,runlocal"]
CASES = (
    [("demo.py", a) for a in ["", "model=grain", "model=clip", "runlocal", "model=clip,runlocal", "runlocal,evals=false"]]
    + [(name, a) for name in ("grain_cc12m.py", "grain_cc3m.py", "clip_cc12m.py") for a in [""] + VARIANTS]
    + [(f"ablations/{name}.py", a) for name in ("clip", "noloc", "no_word", "per_device_negatives", "box_factor")
       for a in ABLATION_BASES]
    + [("ablations/names_only_captions.py", a) for a in ("dataset=demo", "dataset=demo,runlocal")]
    + [("ablations/num_queries.py", f"n={n}") for n in (1, 3, 5, 10)]
    + [("ablations/num_queries.py", "10"), ("ablations/box_factor.py", "factor=1.0,dataset=cc3m"),
       ("ablations/per_device_negatives.py", "groups=8")]
)


def _load(path):
    spec = importlib.util.spec_from_file_location(f"config_{path.replace('/', '_')[:-3]}", os.path.join(CONFIGS, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_file_is_covered():
    files = {os.path.relpath(os.path.join(root, f), CONFIGS) for root, _, names in os.walk(CONFIGS)
             for f in names if f.endswith(".py") and f not in ("__init__.py", "common.py", "_base.py")}
    assert files == {path for path, _ in CASES}


@pytest.mark.parametrize("path,arg", CASES)
def test_config_loads_and_validates(path, arg):
    config = _load(path).get_config(arg or None)
    trainer.validate_config(config, num_devices=8)
    assert config.model_name in list_models()
    # Durations: exactly one total, positive; converting them works for a plausible dataset.
    steps = optimizer.steps_from_duration(config, "total", num_train_examples=10_000_000,
                                          global_batch_size=config.global_batch_size)
    warmup = optimizer.steps_from_duration(config, "warmup", num_train_examples=10_000_000,
                                           global_batch_size=config.global_batch_size, default=0)
    assert 0 <= warmup < steps
    loss = config.loss.to_dict()
    assert loss["description_negatives"] in ("global", "per_device")
    if loss["description_negatives"] == "per_device":
        assert config.global_batch_size % loss["negative_groups"] == 0
    # Only the demo and the runlocal smoke variants read the embedded synthetic data; the
    # others need --config.data.dir.
    assert (path == "demo.py" or "runlocal" in arg or "dataset=demo" in arg) == (config.synthetic is not None)
    assert config.data.dir is None


def test_arguments_change_what_they_say():
    assert _load("grain_cc12m.py").get_config("variant=L/14").model_name == "grain-vit-l14"
    assert _load("clip_cc12m.py").get_config("S/16").model_name == "clip-vit-s16"
    assert _load("demo.py").get_config("model=clip").model_name == "clip-tiny"
    assert _load("ablations/num_queries.py").get_config("n=3").model.num_queries == 3
    assert _load("ablations/noloc.py").get_config(None).loss.box_l1 == 0.0
    assert _load("ablations/no_word.py").get_config(None).loss.region_description == 0.0
    assert _load("ablations/box_factor.py").get_config(None).loss.box_factor == 1.5
    assert _load("ablations/clip.py").get_config("dataset=cc3m").model_name == "clip-vit-b16"
    assert _load("ablations/clip.py").get_config("dataset=demo").model_name == "clip-tiny"
    demo, noloc = _load("demo.py").get_config(None).to_dict(), _load("ablations/noloc.py").get_config("dataset=demo").to_dict()
    assert {k: v for k, v in noloc.items() if k not in ("loss", "evals")} == {
        k: v for k, v in demo.items() if k not in ("loss", "evals")}  # the demo's model, data and schedule
    assert noloc["loss"] == {**demo["loss"], "box_l1": 0.0, "box_giou": 0.0}
    assert _load("ablations/names_only_captions.py").get_config("dataset=demo").synthetic["mllm_captions"] == "names_only"
    with pytest.raises(ValueError, match="names_only_captions changes the embedded benchmark; dataset must be demo"):
        _load("ablations/names_only_captions.py").get_config("dataset=cc12m")
    cc12m = _load("grain_cc12m.py").get_config(None)
    assert (cc12m.global_batch_size, cc12m.total_epochs, cc12m.warmup_epochs) == (2048, 35.0, 1.0)
    assert (cc12m.lr_start, cc12m.lr, cc12m.lr_end) == (1e-6, 1e-3, 1e-5)


@pytest.mark.parametrize("arg,message", [("varient=B/16", "unknown config argument 'varient'"),
                                         ("variant=B/17", "variant must be one of"),
                                         ("runlocal=maybe", "must be a boolean")])
def test_bad_arguments_fail_naming_them(arg, message):
    with pytest.raises(ValueError, match=message):
        _load("grain_cc12m.py").get_config(arg)


def test_validation_names_the_bad_key():
    config = _load("demo.py").get_config(None)
    config.global_batch_size = 12
    with pytest.raises(ValueError, match="global_batch_size=12"):
        trainer.validate_config(config, num_devices=8)


def test_demo_zero_shot_benchmark_follows_the_data_cache_whatever_data_trains(tmp_path):
    config = _load("demo.py").get_config("runlocal")
    config.data.dir, config.data_cache_dir = str(tmp_path / "prepared"), str(tmp_path / "cache")
    resolved = trainer.resolve_data(config, str(tmp_path / "workdir"))
    assert resolved.data.dir == resolved.evals.val.data.dir == str(tmp_path / "prepared")
    assert resolved.evals.zeroshot.synthetic_dir == str(tmp_path / "cache")
    assert resolved.evals.zeroshot.synthetic.to_dict() == dict(resolution=32, num_train=64, num_test_per_class=2)
    assert not os.path.exists(tmp_path / "cache")  # made by the evaluator when it first needs it
    config.data_cache_dir = None  # default: WORKDIR/data
    assert trainer.resolve_data(config, str(tmp_path / "w")).evals.zeroshot.synthetic_dir == str(tmp_path / "w" / "data")


def test_demo_trains_on_prepared_data_and_evaluates_zero_shot_on_the_benchmark(tmp_path):
    """--config.data.dir=PREPARED (a user's prepared data: no synthetic.json) trains, evaluates, exits 0."""
    from grain_jax.data.synthetic import ensure_synthetic
    generated = ensure_synthetic(str(tmp_path / "generated"), **_load("demo.py").get_config("runlocal").synthetic)
    prepared = tmp_path / "prepared"
    shutil.copytree(generated, prepared, ignore=shutil.ignore_patterns("synthetic.json", "zeroshot"))
    workdir, cache = tmp_path / "workdir", tmp_path / "cache"
    result = subprocess.run(_train_utils.cli(str(workdir), str(cache), f"--config.data.dir={prepared}"),
                            cwd=_train_utils.REPO, env=_train_utils.subprocess_env(), capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(workdir / "config.json") as f:
        assert json.load(f)["data"]["dir"] == str(prepared)
    with open(workdir / trainer.FINAL_METRICS) as f:
        final = json.load(f)
    assert {"eval/val/loss/total", "eval/0shot/synthetic_novel/top1", "eval/0shot/synthetic_seen/top1"} <= set(final)
    assert os.path.isdir(cache / "zeroshot" / "novel")


def test_every_model_and_loss_field_is_overridable_from_the_command_line():
    """The binary locks the config (unknown keys are rejected): every GrainModel / LossConfig field is a key."""
    from grain_jax.train import state
    config = _load("demo.py").get_config("runlocal")
    config.lock()
    config.model.vit_qk_norm, config.model.decoder_layers, config.model.vit_ln_eps = False, 3, 1e-5
    config.loss.box_factor = 1.5
    with pytest.raises(TypeError):
        config.model.vit_qk_norm = "no"
    model = state.build_model(config)
    assert (model.vit_qk_norm, model.decoder_layers, model.vit_ln_eps) == (False, 3, 1e-5)
    assert (model.vit_variant, model.text_layers) == ("Mu/8", 1)  # unset fields: the registry's / the config's
    assert LossConfig(**config.loss).box_factor == 1.5


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="--config.data.dir="):
        trainer.resolve_data(_load("grain_cc12m.py").get_config(None), str(tmp_path))


def test_binary_rejects_an_unknown_config_key(tmp_path):
    result = subprocess.run(
        # The repository-root path of the README (``configs/`` links to grain_jax/configs/).
        [sys.executable, "-m", "grain_jax.cli.train", "--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
         "--config.totl_steps=5"], cwd=_train_utils.REPO, env=_train_utils.subprocess_env(),
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "totl_steps" in result.stderr
    assert not os.listdir(tmp_path)  # failed before doing anything
