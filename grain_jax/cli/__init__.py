"""The console scripts, one module per binary (``setup.py`` maps ``grain-jax-X`` to ``cli/X.py:run``).

The top layer: binaries import the library, nothing in the library imports a binary.
"""
from __future__ import annotations

import sys
from typing import Sequence

from absl import flags


def parse_argv(fv: flags.FlagValues, argv: Sequence[str]) -> flags.FlagValues:
    """Parses ``argv`` (program name first) into ``fv``; --help prints the flags and exits."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        sys.exit(0)
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        sys.exit(f"{argv[0]}: {e}\nrun with --help for the flags")
    if len(rest) > 1:
        sys.exit(f"{argv[0]}: unexpected arguments {rest[1:]}")
    return fv
