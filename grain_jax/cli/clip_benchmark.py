"""grain-jax-clip-benchmark: CLIP_benchmark's CLI with grain_jax checkpoints as model type ``grain_jax``.

    grain-jax-clip-benchmark eval --pretrained CHECKPOINT_DIR --model grain \\
        --dataset wds/mydata --dataset_root /data/mydata --task zeroshot_classification

The flags and ``--help`` are CLIP_benchmark's own (argparse); errors are one line, as in the other
binaries. See ``grain_jax.integrations.clip_benchmark``. Needs the ``benchmark`` extra.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from grain_jax.cli import console

PROGRAM = "grain-jax-clip-benchmark"


def run(argv: Sequence[str] | None = None) -> None:
    """Console script: CLIP_benchmark's CLI with our model type registered (and default)."""
    with console.one_line_errors(PROGRAM):
        try:
            from clip_benchmark import cli
        except ImportError:
            raise console.Failure("needs CLIP_benchmark: pip install -e '.[benchmark]'") from None
        from grain_jax.integrations.clip_benchmark import MODEL_TYPE, register
        register()
        args = list(sys.argv[1:] if argv is None else argv)
        if args and args[0] == "eval" and not any(a == "--model_type" or a.startswith("--model_type=") for a in args):
            args += ["--model_type", MODEL_TYPE]
        sys.argv = [sys.argv[0]] + args
        cli.main()
