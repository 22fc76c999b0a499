"""What every ablation shares: the base experiment's arguments and the config they modify."""
from grain_jax.configs import common, demo, grain_cc3m, grain_cc12m

DATASETS = ("cc12m", "cc3m", "demo")


def parse(arg, **extra):
    """Ablation arguments: ``dataset`` (cc12m|cc3m|demo), ``variant``, ``runlocal``, plus ``extra``.

    ``dataset=demo`` is the embedded benchmark with the demo's tiny model and schedule
    (``variant`` does not apply); ``benchmarks/ablation.py`` runs every ablation on it.
    """
    return common.parse_arg(arg, **extra, dataset="cc12m", variant="B/16", runlocal=False)


def base_config(args, model: str = "grain"):
    """The base experiment of ``args.dataset`` for ``model`` (grain|clip)."""
    if args.dataset == "demo":
        return demo.get_config(f"model={model},runlocal={args.runlocal}")
    if args.dataset == "cc3m":
        return grain_cc3m.get_config(f"variant={args.variant},runlocal={args.runlocal},model={model}")
    if args.dataset == "cc12m":
        return grain_cc12m.build(variant=args.variant, runlocal=args.runlocal, model=model)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {args.dataset!r}")
