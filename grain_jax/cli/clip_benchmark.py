"""grain-jax-clip-benchmark: CLIP_benchmark's CLI with grain_jax checkpoints as model type ``grain_jax``.

    grain-jax-clip-benchmark eval --pretrained CHECKPOINT_DIR --model grain \\
        --dataset wds/mydata --dataset_root /data/mydata --task zeroshot_classification

See ``grain_jax.integrations.clip_benchmark``. Needs ``pip install clip_benchmark``.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence


def run(argv: Sequence[str] | None = None) -> None:
    """Console script: CLIP_benchmark's CLI with our model type registered (and default)."""
    try:
        from clip_benchmark import cli
    except ImportError as e:
        raise SystemExit("grain-jax-clip-benchmark needs CLIP_benchmark: pip install clip_benchmark") from e
    from grain_jax.integrations.clip_benchmark import MODEL_TYPE, register
    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "eval" and not any(a == "--model_type" or a.startswith("--model_type=") for a in args):
        args += ["--model_type", MODEL_TYPE]
    sys.argv = [sys.argv[0]] + args
    cli.main()
