"""A full disk during a checkpoint save: refuse early when the size is known, one clear error otherwise.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it on commit, so a
save that runs out of space never touches the last committed step; this module turns the
raw tensorstore ``RESOURCE_EXHAUSTED ... No space left on device`` traceback into one
``DiskFullError`` line (path, bytes needed vs free) and removes the partial directory.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Any

import jax

TMP_SUFFIX = ".orbax-checkpoint-tmp"


class DiskFullError(OSError):
    """Not enough space to write a checkpoint (the last committed one is untouched); ``errno`` is ENOSPC."""

    def __init__(self, text: str):
        super().__init__(text)
        self.errno = errno.ENOSPC


def bytes_to_write(*trees: Any) -> int:
    """Bytes of array data this process writes for ``trees`` (its replica-0 shards; uncompressed)."""
    total = 0
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.Array):
            total += sum(shard.data.nbytes for shard in leaf.addressable_shards if shard.replica_id == 0)
        else:
            total += getattr(leaf, "nbytes", 0)
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _existing(path: str) -> str:
    """``path`` or its nearest existing parent (what ``disk_usage`` can measure)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def last_committed(directory: str) -> int | None:
    """The newest committed step directory under ``directory`` (uncommitted ones end in TMP_SUFFIX)."""
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []
    return max(steps, default=None)


def message(directory: str, step: int, needed: int) -> str:
    last = last_committed(directory)
    free = shutil.disk_usage(_existing(directory)).free
    kept = (f"the last committed checkpoint (step {last}) is untouched" if last is not None
            else "no checkpoint was committed before")
    return (f"not enough disk space to save checkpoint step {step} under {directory}: about {_mib(needed)} needed, "
            f"{_mib(free)} free; {kept}. Free some space (or move the workdir) and rerun the same command to resume")


def check_free_space(directory: str, step: int, needed: int) -> None:
    """Raises ``DiskFullError`` before a save of ``needed`` bytes that cannot fit."""
    if shutil.disk_usage(_existing(directory)).free < needed:
        raise DiskFullError(message(directory, step, needed))


@contextlib.contextmanager
def disk_full_as_error(directory: str, step: int, needed: int):
    """Re-raises a failed write of ``step`` that ran out of space as ``DiskFullError``, its partial directory removed."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:  # noqa: BLE001  (only the disk-full kind is translated)
        if not is_disk_full(error):
            raise
        remove_partial(directory, step)
        raise DiskFullError(message(directory, step, needed)) from error


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC as an OSError, or as tensorstore reports it (a ValueError with the errno in its text)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def remove_partial(directory: str, step: int) -> None:
    """Deletes the uncommitted ``<step>.orbax-checkpoint-tmp*`` directories of ``step`` (process 0)."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(f"{step}{TMP_SUFFIX}"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
