"""The console scripts, one module per binary (``setup.py`` maps ``grain-jax-X`` to ``cli/X.py:run``).

Every binary works the same way. Its flags are absl flags on a FlagValues of its own, built per call, so
importing a binary defines nothing global and ``main(argv)`` (program name first) can run in-process
any number of times. ``parse`` gives it ``--help`` (the module docstring, then the flags), ``--verbosity``,
the quiet console (``console.setup``) and one-line errors for command-line mistakes (exit status 2);
``run(program, main)`` is the console script, where any other failure is one line too (``console``).

The top layer: binaries import the library, nothing in the library imports a binary.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from typing import Callable, Mapping, Sequence

from absl import flags

from grain_jax.cli import config_help, console

HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _is_checkpoint(path: str) -> bool:
    from grain_jax import checkpoints  # here: --help needs neither jax nor orbax
    return path.startswith("random:") or os.path.isfile(os.path.join(path, checkpoints.MODEL_CONFIG))


_EXISTS = {"file": os.path.isfile, "directory": os.path.isdir, "path": os.path.exists, "checkpoint": _is_checkpoint}
_MISSING = {"file": "no such file", "directory": "no such directory", "path": "no such file or directory",
            "checkpoint": "not a checkpoint (give a training workdir, a converted checkpoint or random:MODEL_NAME)"}


@dataclasses.dataclass(frozen=True)
class Command:
    """A positional command (``grain-jax-prepare reference ...``): the flags it needs and the other flags it
    reads. Giving a flag that the command does not read is a mistake, not something silently ignored."""
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def usage(doc: str, fv: flags.FlagValues) -> str:
    """``--help``: the binary's docstring, then every flag (definition order) with its help and default."""
    lines = [doc.strip(), "", "flags:"]
    for flag in dict.fromkeys(fv[name] for name in fv):  # short names map to the same flag
        text = flag.help
        default = ",".join(map(str, flag.default)) if isinstance(flag.default, list) else flag.default
        if not (default is None or default is False or default == ""):
            text += f" (default: {str(default).lower() if flag.boolean else default})"
        spelled = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        lines.append(textwrap.fill(text, 110, initial_indent=f"  {spelled:<20} ", subsequent_indent=" " * 23))
    return "\n".join(lines)


def _underscores(argv: Sequence[str], fv: flags.FlagValues) -> list[str]:
    """``--quick-gelu`` / ``--no-quick-gelu`` -> ``--quick_gelu`` / ``--noquick_gelu`` for known flags: the
    argparse spellings some binaries documented before they moved to absl."""
    out = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=")
        if arg.startswith("--") and "-" in name:
            under = name.replace("-", "_")
            if under.startswith("no_") and under[3:] in fv and fv[under[3:]].boolean:
                under = "no" + under[3:]
            if under in fv or under.startswith("no") and under[2:] in fv:
                arg = f"--{under}{sep}{value}"
        out.append(arg)
    return out


def _paths(flag: flags.Flag) -> list[str]:
    """The paths a flag names: its value, or each comma-separated item of a list or repeated flag."""
    if flag.value is None:
        return []
    if isinstance(flag.value, list):
        return [item for value in flag.value for item in value.split(",") if item]
    return [flag.value]


def parse(argv: Sequence[str], fv: flags.FlagValues, doc: str, *, required: Sequence[str] = (),
          paths: Mapping[str, str] | None = None, commands: Mapping[str, Command] | None = None) -> str | None:
    """Parses ``argv`` (program name first) into ``fv`` and sets up the console at ``--verbosity``.

    ``required``: flags that must be given; ``paths``: {flag: "file" | "directory" | "path" | "checkpoint"} that must
    exist when given (checked here, before any work); ``commands``: {name: Command} when the binary takes
    one positional command, which is returned. ``--help`` prints ``usage`` and exits 0; any mistake raises
    a ``console.UsageError`` naming what to fix."""
    flags.DEFINE_integer("verbosity", 0, "0: progress and result lines; 1: also the libraries' logs (orbax, "
                         "tfds, clu) and tracebacks", short_name="v", flag_values=fv)
    if any(arg in HELP for arg in argv[1:]):
        print(usage(doc, fv))
        sys.exit(0)
    argv = _underscores(argv, fv)
    try:
        rest = fv(argv)
    except flags.Error as error:
        message = str(error).splitlines()[0]
        if message.startswith("flag --config="):  # the config file raised: say what it raised
            message = config_help.explain(config_help.spec_from_argv(argv), argv, error)
        raise console.UsageError(message) from None
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as error:  # config_flags applying --config.*
        raise console.UsageError(config_help.explain(config_help.spec_from_argv(argv), argv, error)) from None
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # libraries (grain) read their own absl flags: their defaults
    console.setup(fv.verbosity)
    command, prefix = None, ""
    if commands:
        if len(rest) != 2 or rest[1] not in commands:
            got = f"got {' '.join(rest[1:])!r}" if len(rest) > 1 else "got none"
            raise console.UsageError(f"give one command of {', '.join(commands)} ({got}; see --help)")
        command, prefix = rest[1], f"{rest[1]}: "
        spec = commands[command]
        required = (*required, *spec.required)
        given = dict.fromkeys(fv[name].name for name in fv if fv[name].present)
        foreign = [f"--{name}" for name in given if name != "verbosity" and name not in spec.required + spec.optional]
        if foreign:
            raise console.UsageError(f"{prefix}{', '.join(foreign)} do not apply to this command (see --help)")
    elif len(rest) > 1:
        raise console.UsageError(f"unexpected arguments {rest[1:]} (flags are --name=value; see --help)")
    missing = [f"--{name}" for name in required if fv[name].value in (None, "", [])]
    if missing:
        raise console.UsageError(f"{prefix}missing {', '.join(missing)} (see --help)")
    for name, kind in (paths or {}).items():
        for path in _paths(fv[name]):
            if not _EXISTS[kind](path):
                raise console.UsageError(f"--{name} {path}: {_MISSING[kind]}")
    return command


def run(program: str, main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """The console script: ``main([program, *argv])`` (default: the command line) with one-line errors."""
    with console.one_line_errors(program):
        main([program, *(sys.argv[1:] if argv is None else argv)])
