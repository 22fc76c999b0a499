"""Config files on the command line: ``--print_config`` and one-line explanations of what went wrong."""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import Any, Iterator, Sequence

import ml_collections
from absl import flags

from grain_jax.cli import console

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=\s]+)")
# Keys that moved: old dotted key -> new one.
_MOVED = {"model.text_length_buckets": "data.text_length_buckets"}


def spec_from_argv(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` (``PATH.py[:ARGS]``) in ``argv``, or None."""
    for index, arg in enumerate(argv):
        if arg in ("--config", "-config") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(("--config=", "-config=")):
            return arg.partition("=")[2]
    return None


def from_flags(fv: flags.FlagValues, argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The parsed ``--config`` with its overrides applied; a missing flag, file or key is one UsageError."""
    spec = spec_from_argv(argv)
    if not spec:
        raise console.UsageError("--config is required, e.g. --config configs/demo.py (see --help)")
    try:
        config = fv.config
        config.keys()  # a file that failed to load gives an object that raises on first use
        return config
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as error:
        raise console.UsageError(explain(spec, argv, error)) from error


def load(spec: str) -> ml_collections.ConfigDict:
    """``PATH.py[:ARG]`` -> ``get_config(ARG)`` of that file, without any ``--config.KEY`` override."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_grain_jax_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def flatten(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf, in the config's own order."""
    items = config.items() if isinstance(config, (ml_collections.ConfigDict, dict)) else ()
    for key, value in items:
        if isinstance(value, (ml_collections.ConfigDict, dict)) and value:
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def describe(config: ml_collections.ConfigDict, spec: str) -> str:
    """``--print_config``: every key with its value, as the override that would set it."""
    lines = [f"# {spec}: every key and its value; override any with --config.KEY=VALUE"]
    lines += [f"{key} = {value!r}" for key, value in flatten(config)]
    return "\n".join(lines)


def _missing_key(config: ml_collections.ConfigDict, key: str) -> str | None:
    """Why ``--config.KEY`` names nothing in ``config`` (with a did-you-mean), or None if it exists."""
    if key in _MOVED:
        return f"--config.{key}: this key is now --config.{_MOVED[key]}"
    node, done = config, []
    for part in key.split("."):
        where = "the config" if not done else "config." + ".".join(done)
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return f"--config.{key}: {where} is a value ({node!r}), not a group of keys"
        keys = list(node.keys())
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            if close:
                return f"--config.{key}: {where} has no key {part!r}; did you mean --config.{'.'.join(done + close)}?"
            listed = ", ".join(sorted(keys)) if keys else "none"
            return f"--config.{key}: {where} has no key {part!r} (its keys: {listed})"
        node = node[part]
        done.append(part)
    return None


def explain(spec: str | None, argv: Sequence[str], error: BaseException) -> str:
    """One line saying what is wrong with ``--config SPEC`` and its overrides in ``argv``, given the
    ``error`` ml_collections raised while building the config."""
    if not spec:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        known = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
        close = difflib.get_close_matches(os.path.basename(path), known, n=1)
        hint = f"; did you mean {os.path.join(os.path.dirname(path), close[0])}?" if close else ""
        return f"--config {spec}: no such file {path}{hint}"
    try:
        base = load(spec)
    except Exception as load_error:  # noqa: BLE001 -- reported in one line, whatever the config file raised
        return f"--config {spec}: get_config failed: {type(load_error).__name__}: {load_error}"
    for arg in argv:
        match = _OVERRIDE.match(arg)
        problem = _missing_key(base, match.group(1)) if match else None
        if problem:
            return problem
    message = str(error.args[0] if error.args else error).strip().strip("'\"")
    return f"--config {spec}: {type(error).__name__}: {message}".splitlines()[0]
