"""What every ablation shares: the base experiment's arguments and the GRAIN config they modify."""
from grain_jax.configs import common, grain_cc3m, grain_cc12m

DATASETS = {"cc12m": grain_cc12m, "cc3m": grain_cc3m}


def parse(arg, **extra):
    """Ablation arguments: ``dataset`` (cc12m|cc3m), ``variant``, ``runlocal``, plus ``extra``."""
    return common.parse_arg(arg, **extra, dataset="cc12m", variant="B/16", runlocal=False)


def base_config(args):
    if args.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {args.dataset!r}")
    return DATASETS[args.dataset].get_config(f"variant={args.variant},runlocal={args.runlocal}")
