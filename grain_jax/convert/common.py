"""Shared pieces of the PyTorch -> Flax converters.

Loading never executes pickled code: ``.pth``/``.pt``/``.bin``/``.tar`` files go through
``torch.load(weights_only=True)`` (tensors, containers and plain numbers only; anything
else is refused), ``.safetensors`` through ``safetensors``. TorchScript archives (the
OpenAI CLIP ``.pt`` files) are read with ``torch.jit.load``, whose restricted unpickler
only rebuilds TorchScript modules and tensors, when the caller allows it.

A conversion builds a nested dict of numpy arrays with a ``TensorSource`` (which records
which PyTorch keys were consumed), then ``check_against_model`` compares it with the
Flax model's parameter shapes: any missing, unexpected or shape-mismatched parameter is
an error naming every offending path.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

log = logging.getLogger(__name__)

Params = dict  # nested {name: dict | np.ndarray}


class ConversionError(ValueError):
    """The checkpoint cannot be converted (refused, incomplete or of the wrong shape)."""


def _torch():
    try:
        import torch
    except ImportError as e:  # torch is the optional "convert" extra
        raise ImportError("checkpoint conversion needs PyTorch (CPU build): pip install -e '.[convert]'") from e
    return torch


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_checkpoint(path: str, *, allow_torchscript: bool = False) -> Any:
    """Reads a checkpoint file without running pickled code.

    Returns the saved object: a flat ``{key: tensor}`` for ``.safetensors`` and
    TorchScript archives, otherwise whatever ``torch.save`` stored (dicts, lists,
    tensors, numbers).

    Raises:
      ConversionError: the file needs arbitrary unpickling (e.g. it contains a pickled
        class or callable), or is a TorchScript archive and ``allow_torchscript`` is False.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001  (SafetensorError and friends: the file is not safetensors)
            raise _refused(path, "it is not a valid .safetensors file", e) from None
    torch = _torch()
    if is_torchscript(path):
        if not allow_torchscript:
            raise _refused(path, "it is a TorchScript archive; only plain state dicts are accepted here")
        log.info("%s is a TorchScript archive: reading its state dict with torch.jit.load", path)
        try:
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception as e:  # noqa: BLE001  (a damaged or fake archive)
            raise _refused(path, "it looks like a TorchScript archive but torch.jit.load cannot read it", e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, "it holds pickled objects other than tensors, containers and numbers "
                       f"(torch.load(weights_only=True) said: {_first_line(e)})",
                       advice="Re-save the state dicts alone (torch.save({'state_dict': ..., "
                       "'backbone_state_dict': ...})) or as .safetensors in an environment you trust.") from None
    except RuntimeError as e:  # e.g. legacy (pre-1.6) tar format, which weights_only cannot read
        raise _refused(path, "torch.load(weights_only=True) cannot read it", e) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refused(path: str, reason: str, error: BaseException | None = None, advice: str = "") -> ConversionError:
    """The one-line refusal every unreadable or unsafe checkpoint gets."""
    said = f" ({type(error).__name__}: {_first_line(error)})" if error is not None else ""
    return ConversionError(f"refusing to load {path}: {reason}{said}. Nothing from it was executed."
                           + (f" {advice}" if advice else ""))


def to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (any float dtype, incl. bf16/fp16) or array -> float32/int numpy."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def state_dict_arrays(state_dict: Mapping[str, Any], *, strip: str = "module.") -> dict[str, np.ndarray]:
    """Tensors of a state dict as numpy, with a leading ``strip`` prefix (DDP's ``module.``)
    removed from every key that has it."""
    arrays = {}
    for key, value in state_dict.items():
        if not hasattr(value, "shape"):
            raise ConversionError(f"state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len(strip):] if strip and key.startswith(strip) else key
        if name in arrays:
            raise ConversionError(f"key {name!r} appears both with and without the {strip!r} prefix")
        arrays[name] = to_numpy(value)
    return arrays


class TensorSource:
    """A read-once view of a state dict that remembers which keys were used.

    ``take`` returns a key's array (after an optional shape check), so a converter is a
    list of ``take`` calls and ``unused()`` is whatever the model has no place for.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], name: str):
        self.arrays, self.name, self.used = dict(arrays), name, set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.arrays:
            raise ConversionError(f"{self.name}: missing key {key!r}")
        value = self.arrays[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"{self.name}: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return value

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted(k for k in self.arrays if k.startswith(prefix))

    def unused(self) -> list[str]:
        return sorted(set(self.arrays) - self.used)


# ---------------------------------------------------------------------- layouts
def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


# ---------------------------------------------------------------------- checking
def abstract_param_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of a grain_jax model's params, without allocating them."""
    import flax.linen as nn

    from grain_jax.models import abstract_params

    return {path: tuple(leaf.shape) for path, leaf in flatten_dict(nn.unbox(abstract_params(model))).items()}


def check_against_model(converted: Params, expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> None:
    """Raises ConversionError listing every missing, unexpected or mis-shaped parameter."""
    got = flatten_dict(converted)
    missing = sorted(set(expected_shapes) - set(got))
    extra = sorted(set(got) - set(expected_shapes))
    mismatched = sorted(p for p in set(got) & set(expected_shapes) if tuple(got[p].shape) != expected_shapes[p])
    problems = [f"missing (the model has it, the checkpoint mapping gave nothing): {'/'.join(p)}" for p in missing]
    problems += [f"unexpected (no such model parameter): {'/'.join(p)}" for p in extra]
    problems += [f"shape mismatch at {'/'.join(p)}: converted {tuple(got[p].shape)}, model {expected_shapes[p]}"
                 for p in mismatched]
    if problems:
        raise ConversionError("converted parameters do not fit the model:\n  " + "\n  ".join(problems))


def report_unused(source: TensorSource, expected_unused: Callable[[str], bool]) -> list[str]:
    """Logs the keys nothing consumed; fails if any of them is not an expected leftover
    (a key the model should have used means the architectures differ)."""
    unused = source.unused()
    surprising = [k for k in unused if not expected_unused(k)]
    if surprising:
        raise ConversionError(f"{source.name}: keys the model has no place for: {surprising}")
    for key in unused:
        log.info("%s: ignoring unused key %s %s", source.name, key, tuple(source.arrays[key].shape))
    return unused


def write_checkpoint(output_dir: str, params: Params, model, spec) -> int:
    """Checks ``params`` against ``model`` (every parameter present, right shapes), then writes
    them as float32 with ``spec`` via ``checkpoints.save_params``. Returns the parameter count."""
    from grain_jax import checkpoints

    check_against_model(params, abstract_param_shapes(model))
    params = unflatten_dict({p: np.asarray(v, np.float32) for p, v in flatten_dict(params).items()})
    checkpoints.save_params(output_dir, params, spec)
    return sum(int(v.size) for v in flatten_dict(params).values())


def matches_any(prefixes: Iterable[str]) -> Callable[[str], bool]:
    prefixes = tuple(prefixes)
    return lambda key: key.startswith(prefixes)
