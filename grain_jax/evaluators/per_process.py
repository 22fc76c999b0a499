"""Evaluation split over processes (big_vision style): each process reads and embeds only its share.

The examples are cut into one contiguous block per process, each padded with masked
entries (index -1) to the same length, so that every process runs the same number of
``InferenceModel`` calls: these are collective over the mesh's devices. In each call
(one global batch of ``model.batch_size`` rows) a process fills only the rows its own
devices hold (``Split.rows``); it never reads the others, which stay zero. Afterwards,
counts are summed and per-example results gathered over the processes in process order,
which is the examples' order: the metrics are the ones one process would compute.

With one process, or a mesh whose batch rows are not divided among the processes, every
process takes all the examples and nothing is combined.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

PADDING = -1  # the example index of a masked entry


def _fed_rows(model) -> np.ndarray:
    """Rows of a global batch that this process's devices hold (where its data goes in ``model``'s calls)."""
    if model.batch_sharding is None:
        return np.arange(model.batch_size)
    rows = np.arange(model.batch_size)
    slices = model.batch_sharding.addressable_devices_indices_map((model.batch_size,)).values()
    return np.unique(np.concatenate([rows[index] for index in slices]))


class Split:
    """This process's share of an eval set for ``model`` (an InferenceModel)."""

    def __init__(self, model):
        self.batch_size = model.batch_size
        self.rows = _fed_rows(model)  # [local batch size] positions in a global batch
        self.processes = jax.process_count()
        if len(self.rows) * self.processes != self.batch_size:  # rows shared by processes: nothing to split
            self.rows, self.processes = np.arange(self.batch_size), 1
        self.index = jax.process_index() if self.processes > 1 else 0

    @property
    def local_batch_size(self) -> int:
        return len(self.rows)

    def share(self, indices: np.ndarray) -> np.ndarray:
        """This process's block of ``indices`` [N], padded with ``PADDING`` to a length every process has,
        a multiple of ``local_batch_size``."""
        per_process = -(-len(indices) // self.processes)
        length = -(-per_process // self.local_batch_size) * self.local_batch_size
        mine = np.asarray(indices)[self.index * per_process:(self.index + 1) * per_process]
        return np.concatenate([mine, np.full(length - len(mine), PADDING, mine.dtype)])

    def to_global(self, local: np.ndarray) -> np.ndarray:
        """[local_batch_size, ...] -> [batch_size, ...] with this process's rows in place (zeros elsewhere)."""
        out = np.zeros((self.batch_size,) + local.shape[1:], local.dtype)
        out[self.rows] = local
        return out

    def local(self, global_rows: np.ndarray) -> np.ndarray:
        """[batch_size, ...] -> this process's [local_batch_size, ...]."""
        return global_rows[self.rows]

    def sum(self, x: np.ndarray) -> np.ndarray:
        """``x`` summed over the processes."""
        x = np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x)).sum(0) if self.processes > 1 else x

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Every process's ``rows`` [n_p, ...] concatenated in process order (n_p may differ)."""
        if self.processes == 1:
            return rows
        counts = self.gather_objects([len(rows)])
        padded = np.zeros((max(counts),) + rows.shape[1:], rows.dtype)
        padded[:len(rows)] = rows
        gathered = np.asarray(multihost_utils.process_allgather(padded))
        return np.concatenate([part[:n] for part, n in zip(gathered, counts)])

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every process's JSON-able ``items`` concatenated in process order."""
        if self.processes == 1:
            return items
        encoded = np.frombuffer(json.dumps(items).encode(), np.uint8)
        lengths = np.asarray(multihost_utils.process_allgather(np.int64(len(encoded))))
        padded = np.zeros(int(lengths.max()), np.uint8)
        padded[:len(encoded)] = encoded
        gathered = np.asarray(multihost_utils.process_allgather(padded))
        return [item for part, n in zip(gathered, lengths) for item in json.loads(part[:n].tobytes())]
