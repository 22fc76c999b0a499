r"""GRAIN on CC12M (the paper's main setting).

ViT-B/16 image tower (``:variant=S/16|B/16|L/14``), 5 region queries + 1 global query,
global batch 2048 (16 GPUs x 128 in the reference), 35 epochs, AdamW (0.9, 0.98, 1e-8,
wd 0.1), lr 1e-6 -> 1e-3 over 1 warmup epoch, cosine to 1e-5.

    grain-jax-train --config configs/grain_cc12m.py:variant=B/16 --workdir /shared/runs/grain_b16 \
        --config.data.dir=/shared/cc12m_prepared --config.evals.zeroshot.descriptors=/shared/descriptors \
        --config.evals.zeroshot.data_dir=/shared/tfds
    grain-jax-train --config configs/grain_cc12m.py:runlocal --workdir workdirs/grain_smoke   # smoke test

Arguments: ``variant`` (S/16, B/16, L/14), ``runlocal`` (tiny batch and steps on the embedded
synthetic data, the real model: a smoke test; at B/16 it needs about 13 GB of RAM on CPU).
"""
from grain_jax.configs import common

VARIANTS = {"S/16": "vit-s16", "B/16": "vit-b16", "L/14": "vit-l14"}


def build(*, variant: str = "B/16", runlocal: bool = False, model: str = "grain"):
    """The GRAIN (``model="grain"``) or CLIP (``model="clip"``) CC12M experiment."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    config = common.base_config()
    config.model_name = f"{model}-{VARIANTS[variant]}"
    if model == "grain":
        config.model.num_queries = 5  # region queries; the global query comes on top
    # One nn.scan per tower: the B/16 train step compiles in 0.58x the CPU time of the unrolled one (S/16 0.62x;
    # docs/performance.md). Unrolled checkpoints and converted weights still load (converted on load); a workdir
    # resumes only with the value it was written with.
    config.model.scan_layers = True
    config.data = common.data_config(image_size=224)
    config.total_epochs = 35.0
    config.warmup_epochs = 1.0
    config.global_batch_size = 2048
    config.log_every_steps = 50
    config.checkpoint_every_steps = 2000
    config.evals.val = dict(type="validation", every_steps=2000, data=config.data, loss=config.loss,
                            batch_size=config.global_batch_size, max_batches=10)
    # Datasets not prepared under data_dir are skipped with a warning; set data_dir / descriptors with
    # --config.evals.zeroshot.descriptors=DIR --config.evals.zeroshot.data_dir=DIR ("" = none given;
    # strings, not None, so that both can be overridden from the command line).
    config.evals.zeroshot = dict(type="zeroshot", every_steps=10000, datasets="all", data_dir="",
                                 descriptors="", templates="ref46", max_examples=10000)

    if runlocal:
        config.synthetic = dict(resolution=64, num_train=64, num_test_per_class=2)  # generated on first use
        config.global_batch_size = 8
        config.total_epochs = None
        config.warmup_epochs = None
        config.total_steps = 4
        config.warmup_steps = 1
        config.log_every_steps = 1
        config.checkpoint_every_steps = 2
        config.evals.val.update(batch_size=8, max_batches=1)
        config.evals.val.every_steps = 0
        config.evals.zeroshot = dict(type="zeroshot", every_steps=0, datasets="synthetic:novel", templates="short",
                                     max_examples=16, synthetic_dir=config.get_ref("data_cache_dir"),
                                     synthetic=config.get_ref("synthetic"))
    return config


def get_config(arg=None):
    args = common.parse_arg(arg, variant="B/16", runlocal=False)
    return build(variant=args.variant, runlocal=args.runlocal)
