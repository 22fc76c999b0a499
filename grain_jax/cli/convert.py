"""grain-jax-convert: import PyTorch weights into a grain_jax checkpoint directory.

usage:
  grain-jax-convert reference --input CHECKPOINT --output DIR [--model grain-vit-b16]
  grain-jax-convert open_clip --input WEIGHTS --arch OPEN_CLIP_ARCH --output DIR [--[no]quick_gelu]

examples:
  grain-jax-convert reference --input ep_34.pth.tar --output ckpt/grain_b16
  grain-jax-convert open_clip --input ViT-B-16.pt --arch ViT-B-16 --output ckpt/clip_b16

The output holds ``model_config.json`` and a params-only orbax checkpoint, readable by
``grain_jax.inference.load(DIR)`` and usable as a training ``config.init_from``. Needs the ``convert``
extra (PyTorch; a CPU build is enough).
"""
from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from grain_jax import cli
from grain_jax.cli import console

PROGRAM = "grain-jax-convert"
COMMANDS = {"reference": cli.Command(required=("input", "output"), optional=("model",)),
            "open_clip": cli.Command(required=("input", "output", "arch"), optional=("quick_gelu",))}
NEEDS_TORCH = ("needs PyTorch, which the default install leaves out: pip install -e '.[convert]' "
               "(a CPU build is enough, see the README's Quick start)")


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("input", None, "reference: ep_N.pth.tar (dict with state_dict + backbone_state_dict) or a "
                        ".safetensors file whose keys are prefixed 'backbone.' / 'decoder.'; open_clip: a state "
                        "dict (.pt/.pth/.bin, or OpenAI's TorchScript .pt) or .safetensors", flag_values=fv)
    flags.DEFINE_string("output", None, "checkpoint directory to write", flag_values=fv)
    flags.DEFINE_string("model", "grain-vit-b16", "reference: the grain_jax model name", flag_values=fv)
    flags.DEFINE_string("arch", None, "open_clip: the architecture name, e.g. ViT-B-16 or ViT-B-16-quickgelu",
                        flag_values=fv)
    flags.DEFINE_bool("quick_gelu", None, "open_clip: force QuickGELU on/off (default: from --arch; OpenAI "
                      "TorchScript files imply on)", flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> dict:
    """Runs the binary on ``argv`` (program name first); returns the conversion summary."""
    fv = _flags()
    command = cli.parse(argv, fv, __doc__, paths={"input": "file"}, commands=COMMANDS)
    try:
        import torch  # noqa: F401 -- both converters read PyTorch files
    except ImportError:
        raise console.Failure(NEEDS_TORCH) from None
    from grain_jax.convert.common import ConversionError
    try:
        if command == "reference":
            from grain_jax.convert import reference
            summary = reference.convert_file(fv.input, fv.output, model_name=fv.model)
        else:
            from grain_jax.convert import open_clip
            summary = open_clip.convert_file(fv.input, fv.output, arch=fv.arch, quick_gelu=fv.quick_gelu)
    except ConversionError as error:
        raise console.Failure(str(error)) from error
    print(f"wrote {fv.output} ({summary['model_name']}, {summary['num_params']} parameters, unused keys: "
          f"{summary['unused'] or 'none'})", flush=True)
    return summary


def run(argv: Sequence[str] | None = None) -> None:
    """Console script ``grain-jax-convert``."""
    cli.run(PROGRAM, main, argv)


if __name__ == "__main__":
    run()
