"""Every binary the same way: --help with the flags and an example (exit 0), one-line errors naming what to
fix (exact first lines; exit 2 for a command-line mistake, 1 for a failure), tracebacks only with
--verbosity=1. Run through the console-script entry points (``run(argv)``); grain-jax-train's own cases
are in test_console.py."""
import subprocess
import sys

import pytest

import _train_utils
from grain_jax import cli
from grain_jax.cli import annotate, compile as compile_cli, console, convert, eval as eval_cli, prepare, visualize
from evaluator_fakes import write_folder

BINARIES = {"grain-jax-eval": eval_cli, "grain-jax-visualize": visualize, "grain-jax-prepare": prepare,
            "grain-jax-convert": convert, "grain-jax-annotate": annotate, "grain-jax-compile": compile_cli}
CHECKPOINT_HINT = "not a checkpoint (give a training workdir, a converted checkpoint or random:MODEL_NAME)"


@pytest.fixture(autouse=True)
def quiet_console_after():
    yield
    console.setup(0)  # a --verbosity=1 case must not leave the session's logging verbose


def _run(module, args, capsys):
    """(exit status, stdout, stderr) of ``module.run(args)``; status 0 when it returns."""
    try:
        module.run(args)
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("program, example", [
    ("grain-jax-eval", "grain-jax-eval --checkpoint workdir/grain --checkpoint workdir/clip \\"),
    ("grain-jax-visualize", "grain-jax-visualize --checkpoint workdir --images img1.jpg,img2.jpg \\"),
    ("grain-jax-prepare", "grain-jax-prepare synthetic --output_dir OUT [--num_train N] [--resolution 64]"),
    ("grain-jax-convert", "grain-jax-convert reference --input ep_34.pth.tar --output ckpt/grain_b16"),
    ("grain-jax-annotate",
     "grain-jax-annotate --images data/images --captions data/captions.csv --output annotated/ \\"),
    ("grain-jax-compile", "grain-jax-compile --config configs/grain_cc12m.py:variant=B/16 --topology v5e-256"),
])
def test_help_lists_the_flags_and_an_example(program, example, capsys):
    status, out, err = _run(BINARIES[program], ["--help"], capsys)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{program}: ") and f"  {example}" in lines
    flags_at = lines.index("flags:")
    assert all(line.startswith(" ") for line in lines[flags_at + 1:])
    assert any(line.startswith("  --verbosity ") for line in lines[flags_at + 1:])


@pytest.mark.parametrize("program, args, status, first_line", [
    ("grain-jax-eval", ["--chekpoint=x"], 2, "Unknown command line flag 'chekpoint'. Did you mean: checkpoint ?"),
    ("grain-jax-eval", [], 2, "give --checkpoint (one or more) and/or --compare results JSONs (see --help)"),
    ("grain-jax-eval", ["--checkpoint=random:x,{tmp}/nope"], 2, f"--checkpoint {{tmp}}/nope: {CHECKPOINT_HINT}"),
    ("grain-jax-eval", ["--checkpoint={tmp}"], 2, f"--checkpoint {{tmp}}: {CHECKPOINT_HINT}"),
    ("grain-jax-eval", ["--compare={tmp}/results.json"], 2, "--compare {tmp}/results.json: no such file"),
    ("grain-jax-eval", ["--checkpoint=random:x", "--batch_size=many"], 2,
     "flag --batch_size=many: invalid literal for int() with base 10: 'many'"),
    ("grain-jax-visualize", ["--checkpoint=random:x", "--descriptions=a"], 2, "missing --images (see --help)"),
    ("grain-jax-visualize", ["--checkpoint=random:x", "--images={tmp}/*.png", "--descriptions=a"], 2,
     "--images: '{tmp}/*.png' matches no file"),
    ("grain-jax-visualize", ["--checkpoint=random:x", "--images={tmp}", "--descriptions=@{tmp}/d.txt"], 2,
     "--descriptions @{tmp}/d.txt: No such file or directory"),
    ("grain-jax-visualize", ["--checkpoint=random:x", "--images={tmp}", "--descriptions=a", "extra"], 2,
     "unexpected arguments ['extra'] (flags are --name=value; see --help)"),
    ("grain-jax-prepare", ["--output_dir={tmp}/out"], 2,
     "give one command of reference, webdataset, synthetic (got none; see --help)"),
    ("grain-jax-prepare", ["refrence", "--output_dir={tmp}/out"], 2,
     "give one command of reference, webdataset, synthetic (got 'refrence'; see --help)"),
    ("grain-jax-prepare", ["reference", "--output_dir={tmp}/out"], 2,
     "reference: missing --captions, --images_root (see --help)"),
    ("grain-jax-prepare", ["reference", "--captions={tmp}/c.csv", "--images_root={tmp}", "--output_dir={tmp}/out"], 2,
     "--captions {tmp}/c.csv: no such file"),
    ("grain-jax-prepare", ["synthetic", "--output_dir={tmp}/out", "--captions=x.csv", "--jpeg_quality=90"], 2,
     "synthetic: --jpeg_quality, --captions do not apply to this command (see --help)"),
    ("grain-jax-prepare", ["webdataset", "--shards={tmp}/{{0..3}}.tar", "--output_dir={tmp}/out"], 2,
     "--shards: no webdataset shard exists for '{tmp}/{{0..3}}.tar' (expanded to 4 paths)"),
    ("grain-jax-convert", ["open_clip", "--input={tmp}/w.pt", "--output={tmp}/out"], 2,
     "open_clip: missing --arch (see --help)"),
    ("grain-jax-convert", ["reference", "--input={tmp}/w.pt", "--output={tmp}/out", "--arch=ViT-B-16"], 2,
     "reference: --arch do not apply to this command (see --help)"),
    ("grain-jax-convert", ["reference", "--input={tmp}/w.pt", "--output={tmp}/out"], 2,
     "--input {tmp}/w.pt: no such file"),
    ("grain-jax-annotate", ["--images={tmp}", "--shards=x.tar", "--output={tmp}/out"], 2,
     "give either --images (with optional --captions) or --shards"),
    ("grain-jax-annotate", ["--images={tmp}/photos", "--output={tmp}/out", "--skip_detect"], 2,
     "--images {tmp}/photos: no such directory"),
    ("grain-jax-annotate", ["--images={tmp}", "--skip_detect"], 2, "missing --output (see --help)"),
    ("grain-jax-annotate", ["--images={tmp}", "--output={tmp}/out"], 2, "--detector is required (or --skip_detect)"),
    ("grain-jax-annotate", ["--images={tmp}", "--output={tmp}/out", "--skip_detect", "--part=2/2"], 2,
     "--part must be I/N with 0 <= I < N, got '2/2'"),
    ("grain-jax-annotate", ["--images={tmp}", "--output={tmp}/out", "--skip_detect"], 2, "no images found in {tmp}"),
    ("grain-jax-annotate", ["--images={tmp}", "--output={tmp}/out", "--skip_detect", "--detector_backend=tf"], 2,
     "flag --detector_backend=tf: value should be one of <jax|torch>"),
    ("grain-jax-compile", [f"--config={_train_utils.REPO}/configs/demo.py"], 2, "missing --topology (see --help)"),
    ("grain-jax-compile", ["--topology=cpu"], 2, "--config is required, e.g. --config configs/demo.py (see --help)"),
])
def test_mistakes_end_in_one_line(program, args, status, first_line, tmp_path, capsys):
    got_status, out, err = _run(BINARIES[program], [a.format(tmp=tmp_path) for a in args], capsys)
    assert (got_status, err.splitlines()) == (status, [f"{program}: error: {first_line.format(tmp=tmp_path)}"]), out
    assert not (tmp_path / "out").exists()  # stopped before doing anything


def test_a_failure_is_one_line_and_the_traceback_needs_verbosity_1(tmp_path, capsys):
    folder = write_folder(tmp_path / "bench", per_class=1, descriptor_file={"zebra": ["stripes"]})
    args = ["--checkpoint=random:x", f"--evals=folder:{folder}", f"--output={tmp_path / 'r.json'}"]
    status, _, err = _run(eval_cli, args, capsys)
    assert status == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("grain-jax-eval: error: ValueError: ") and "not in the dataset: ['zebra']" in err
    assert err.rstrip().endswith(f"({console.TRACEBACK_HINT})")
    status, _, err = _run(eval_cli, [*args, "--verbosity=1"], capsys)
    assert status == 1 and err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("grain-jax-eval: error: ValueError: ")


def test_argparse_spellings_still_parse():
    """--quick-gelu / --no-quick-gelu, as the README documented them under argparse."""
    for spelled, value in (("--quick-gelu", True), ("--no-quick-gelu", False), ("--noquick_gelu", False)):
        fv = convert._flags()
        command = cli.parse(["grain-jax-convert", "open_clip", "--input=w.pt", "--arch=ViT-B-16", "--output=o",
                             spelled], fv, convert.__doc__, commands=convert.COMMANDS)
        assert (command, fv.quick_gelu) == ("open_clip", value)


def test_convert_without_torch_is_one_line(tmp_path):
    (tmp_path / "ep_1.pth.tar").write_bytes(b"")
    code = ("import sys; sys.modules['torch'] = None; from grain_jax.cli.convert import run; "
            f"run(['reference', '--input', '{tmp_path}/ep_1.pth.tar', '--output', '{tmp_path}/out'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=_train_utils.REPO, env=_train_utils.subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"grain-jax-convert: error: {convert.NEEDS_TORCH}"]
    assert not (tmp_path / "out").exists()
