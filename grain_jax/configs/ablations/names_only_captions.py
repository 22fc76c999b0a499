r"""The strict synthetic world: MLLM captions that never name a part or attribute ("names_only").

By default the embedded benchmark's MLLM captions describe each object's look holistically, as
LLaVA-style captions do ("a red, striped dafo with a blue disc"), while part knowledge stays
localised only in the region descriptions. Here the captions only name classes, count and layout,
so everything the global embedding knows about parts must come through the grounding decoder.

    python benchmarks/ablation.py --workdir DIR --runs grain,names_only_captions

Arguments: ``dataset`` (demo only: it changes how the embedded benchmark is generated), ``runlocal``.
"""
from grain_jax.configs.ablations import _base


def get_config(arg=None):
    args = _base.parse(arg)
    if args.dataset != "demo":
        raise ValueError(f"names_only_captions changes the embedded benchmark; dataset must be demo, "
                         f"got {args.dataset!r}")
    config = _base.base_config(args)
    config.synthetic = dict(config.synthetic, mllm_captions="names_only")
    return config
