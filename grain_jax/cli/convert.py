"""``grain-jax-convert``: import PyTorch weights into a grain_jax checkpoint directory.

    grain-jax-convert reference --input ep_34.pth.tar --output ckpt/grain_b16 [--model grain-vit-b16]
    grain-jax-convert open_clip --input ViT-B-16.pt --arch ViT-B-16 --output ckpt/clip_b16

The output holds ``model_config.json`` and a params-only orbax checkpoint, readable by
``grain_jax.inference.load(DIR)`` and usable as a training ``config.init_from``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grain-jax-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    ref = sub.add_parser("reference", help="a checkpoint saved by the authors' PyTorch train.py")
    ref.add_argument("--input", required=True,
                     help="ep_N.pth.tar (dict with state_dict + backbone_state_dict) or a .safetensors file "
                          "whose keys are prefixed 'backbone.' / 'decoder.'")
    ref.add_argument("--output", required=True, help="checkpoint directory to write")
    ref.add_argument("--model", default="grain-vit-b16", help="grain_jax model name (default grain-vit-b16)")
    oc = sub.add_parser("open_clip", help="OpenAI CLIP / open_clip weights into a clip-* model")
    oc.add_argument("--input", required=True, help="state dict: .pt/.pth/.bin (or OpenAI TorchScript .pt) or .safetensors")
    oc.add_argument("--arch", required=True, help="open_clip architecture name, e.g. ViT-B-16 or ViT-B-16-quickgelu")
    oc.add_argument("--output", required=True, help="checkpoint directory to write")
    oc.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                    help="force QuickGELU on/off (default: from --arch; OpenAI TorchScript files imply on)")
    return parser


def run(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from grain_jax.convert.common import ConversionError
    try:
        import torch  # noqa: F401 -- both converters read PyTorch files
    except ImportError:
        raise SystemExit("grain-jax-convert: error: needs PyTorch, which the default install leaves out: "
                         "pip install -e '.[convert]' (a CPU build is enough, see the README's Quick start)") from None
    try:
        if args.source == "reference":
            from grain_jax.convert import reference
            summary = reference.convert_file(args.input, args.output, model_name=args.model)
        else:
            from grain_jax.convert import open_clip
            summary = open_clip.convert_file(args.input, args.output, arch=args.arch, quick_gelu=args.quick_gelu)
    except ConversionError as e:
        raise SystemExit(f"grain-jax-convert: error: {e}") from None
    log.info("wrote %s (%s, %d parameters, unused keys: %s)", args.output, summary["model_name"],
                 summary["num_params"], summary["unused"] or "none")


if __name__ == "__main__":
    run()
