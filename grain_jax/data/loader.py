"""Feeding the step: worker processes, a worker-count-independent iterator state, device prefetch.

``BatchIterator`` reads batch k, k+1, ... of a random-access grain ``MapDataset`` of batches,
in ``num_workers`` worker processes or in-process threads. Batch k depends only on k (never on
which worker built it), so every worker count yields the same stream, and the state is just
``{"next_index": k}``: a checkpoint written with 8 workers resumes exactly with 0 or 32 (and
reads the states grain's own iterators wrote in earlier checkpoints).

In a worker, batch arrays are built in shared-memory blocks (``batch_array``) that the worker
reuses once the training process has dropped the batch; only a handle crosses grain's queue.
Otherwise grain copies every finished array into a new shared-memory block, and the new pages'
faults cost about 15% of a worker's CPU at 224 px (benchmarks/pipeline_throughput.py). A worker
builds one batch at a time, in its main thread: its queue to the training process is the
read-ahead, and decode threads inside a worker only compete with it for the GIL and the cores
(the batch cost ~15% more CPU with two of them).

``DevicePrefetch`` keeps the next ``size`` global batches on device (transfers are
asynchronous, so the step never waits on one) and counts the seconds the step loop spent
blocked on data.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import threading
import time
import weakref
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator

import grain
import numpy as np

AUTO_WORKERS = -1
MAX_AUTO_WORKERS = 16
PARENT_POLL_SECONDS = 1.0
# Arrays smaller than this go to the training process pickled through grain's queue: shared memory
# costs more than copying a few KiB (tokens, boxes, masks).
MIN_SHARED_MEMORY_BYTES = 64 * 1024

_FREE = 1  # the flag byte after a block's data: set by the training process when it drops the batch


@dataclasses.dataclass(frozen=True)
class _BlockHandle:
    """What crosses the queue instead of a batch array built in a worker: its shared-memory block."""
    name: str
    shape: tuple[int, ...]
    dtype: str


class _WorkerBlocks:
    """A worker's shared-memory blocks for batch arrays, reused once the training process has dropped
    the batch in them: a new block per batch costs the kernel a page fault per 4 KiB (measured: about
    3 ms per 4.6 MiB batch, 15% of a worker's CPU at 224 px)."""

    def __init__(self):
        self._blocks: dict[tuple, list[shared_memory.SharedMemory]] = collections.defaultdict(list)
        self._lent: dict[int, tuple[np.ndarray, shared_memory.SharedMemory]] = {}  # id(array) -> (array, block)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        blocks = self._blocks[shape, dtype.str]
        block = next((b for b in blocks if b.buf[nbytes] == _FREE), None)
        if block is None:  # all lent: a new one (zero-filled by the kernel, flag not free)
            block = shared_memory.SharedMemory(create=True, size=nbytes + 1)
            blocks.append(block)
        block.buf[nbytes] = 0
        array = np.ndarray(shape, dtype, buffer=block.buf)
        array.fill(0)
        self._lent[id(array)] = (array, block)
        return array

    def ship(self, batch: Any) -> Any:
        """The batch (a dict) with its values from ``array`` replaced by block handles."""
        if not isinstance(batch, dict):
            return batch
        out = {}
        for key, value in batch.items():
            lent = self._lent.pop(id(value), None)
            out[key] = value if lent is None else _BlockHandle(lent[1].name, value.shape, value.dtype.str)
        return out

    def discard(self, array: np.ndarray) -> None:
        lent = self._lent.pop(id(array), None)
        if lent is not None:
            lent[1].buf[array.nbytes] = _FREE


class _ReceivedBlocks:
    """The training process's side: block handles -> numpy arrays on the workers' blocks, each flagged
    free for its worker when the array (and every view of it) is gone. A block is mapped once and its
    name unlinked right away: the memory then lives exactly as long as the two mappings, and nothing
    is left in shared memory once the worker and the arrays are gone (SIGKILL included)."""

    def __init__(self):
        self._open: dict[str, shared_memory.SharedMemory] = {}

    def receive(self, batch: Any) -> Any:
        if not isinstance(batch, dict):
            return batch
        return {key: self._array(value) if isinstance(value, _BlockHandle) else value
                for key, value in batch.items()}

    def _array(self, handle: _BlockHandle) -> np.ndarray:
        block = self._open.get(handle.name)
        if block is None:
            block = self._open[handle.name] = shared_memory.SharedMemory(handle.name)
            block.unlink()
        array = np.ndarray(handle.shape, np.dtype(handle.dtype), buffer=block.buf)
        weakref.finalize(array, _set_free, block, array.nbytes)
        return array

    def close(self) -> None:
        """Unmaps the blocks (the workers are gone); those still under an array stay until it is dropped."""
        for block in self._open.values():
            with contextlib.suppress(BufferError):
                block.close()
        self._open.clear()


def _set_free(block: shared_memory.SharedMemory, nbytes: int) -> None:
    if block.buf is not None:
        block.buf[nbytes] = _FREE


_worker_blocks: _WorkerBlocks | None = None  # set by ``worker_init`` in grain's worker processes


def worker_init(worker_index: int, worker_count: int) -> None:
    """grain worker start-up (``mp_prefetch(worker_init_fn=...)``): ``batch_array`` allocates in
    shared-memory blocks from now on, and the worker exits with its parent (``exit_with_parent``)."""
    global _worker_blocks
    _worker_blocks = _WorkerBlocks()
    exit_with_parent(worker_index, worker_count)


def batch_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero-filled array [shape] for a batch under construction, to be returned as a value of the
    batch dict. In a grain worker it lives in a shared-memory block, so it reaches the training
    process without a copy; one that is not returned must go to ``discard``."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    if _worker_blocks is not None and math.prod(shape) * dtype.itemsize >= MIN_SHARED_MEMORY_BYTES:
        return _worker_blocks.array(shape, dtype)
    return np.zeros(shape, dtype)


def discard(array: np.ndarray) -> None:
    """Gives back a ``batch_array`` that will not be returned (a failed batch): its block is reused."""
    if _worker_blocks is not None:
        _worker_blocks.discard(array)


def _ship(batch: Any) -> Any:
    """In a worker: the finished batch, its ``batch_array``s as block handles."""
    return _worker_blocks.ship(batch) if _worker_blocks is not None else batch


def exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker start-up (``mp_prefetch(worker_init_fn=...)``): the worker ends itself once the
    training process is gone. A trainer killed by SIGKILL or the OOM killer cannot stop its workers,
    which would otherwise live on (re-parented to init) with their memory."""
    del worker_index, worker_count
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)  # the parent is gone: nothing is waiting for this worker's batches

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity: what SLURM / taskset granted), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int, cores: int | None = None) -> int:
    """``num_workers``, or for ``-1`` one worker per core but one (left to the training loop
    and JAX's host threads), between 1 and ``MAX_AUTO_WORKERS``."""
    num_workers = int(num_workers)
    if num_workers == AUTO_WORKERS:
        cores = available_cores() if cores is None else cores
        return max(1, min(MAX_AUTO_WORKERS, cores - 1))
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, or -1 (sized from the CPU cores), got {num_workers}")
    return num_workers


class BatchIterator(grain.DatasetIterator):
    """Iterates ``dataset[k], dataset[k + 1], ...`` with state ``{"next_index": k}`` (see module doc).

    Args:
      dataset: a ``MapDataset`` whose element k is batch k (finite or ``repeat()``-ed).
      num_workers: worker processes (0 = in this process); ``-1`` = ``resolve_num_workers``.
      prefetch: batches read ahead (per worker, or by in-process threads; 0 = none).
    """

    def __init__(self, dataset: grain.MapDataset, *, num_workers: int = 0, prefetch: int = 2):
        super().__init__()
        self._dataset = dataset
        self.num_workers = resolve_num_workers(num_workers)
        self._prefetch = int(prefetch)
        self._next_index = 0
        self._iterator: Iterator | None = None
        self._received = _ReceivedBlocks()

    def _start(self) -> Iterator:
        if self._iterator is None:
            dataset = self._dataset[self._next_index:]
            if self.num_workers == 0:  # threads read ahead in this process
                dataset = dataset.to_iter_dataset(grain.ReadOptions(
                    num_threads=max(self._prefetch, 1), prefetch_buffer_size=self._prefetch))
            else:  # one batch at a time per worker (module doc), read ahead through its queue
                dataset = grain.experimental.WithOptionsIterDataset(
                    dataset.map(_ship).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
                    grain.experimental.DatasetOptions(min_shm_size=MIN_SHARED_MEMORY_BYTES))
                dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                    num_workers=self.num_workers, per_worker_buffer_size=max(self._prefetch, 1)),
                    worker_init_fn=worker_init)
            self._iterator = iter(dataset)
        return self._iterator

    def __next__(self):
        batch = self._received.receive(next(self._start()))
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, Any]) -> None:
        """Takes ``{"next_index": k}``, or the state grain's own multi-worker iterator wrote (earlier
        checkpoints with ``num_workers > 0``): its workers take turns, so k is the sum of the
        batches each has handed over."""
        if "iterators_in_use_states" in state:
            next_index = sum(int(worker["next_index"]) for worker in state["iterators_in_use_states"])
        elif set(state) == {"next_index"}:
            next_index = int(state["next_index"])
        else:
            raise ValueError(f"data iterator state must be {{'next_index': k}}, got keys {sorted(state)}")
        self.close()
        self._next_index = next_index

    def start_prefetch(self) -> None:
        """Starts the workers now (grain's checkpoint handler calls this after a restore)."""
        self._start()

    def close(self) -> None:
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            self._iterator = None
            if close is not None:
                close()
            self._received.close()


class DevicePrefetch(grain.DatasetIterator):
    """Host batches -> device batches placed ``size`` steps ahead; checkpointable like its source.

    Args:
      source: a host-batch iterator with ``get_state`` / ``set_state`` (e.g. ``BatchIterator``).
      place: host batch -> device batch (e.g. ``pipeline.to_global`` onto the batch sharding);
        JAX transfers asynchronously, so placing early overlaps the copy with the running step.
      size: batches kept on device besides the one returned (1 = double buffering).

    ``get_state`` is the source's state *before* the batches still queued here, so a checkpoint
    resumes with the first batch the step has not seen. ``data_wait_s`` accumulates the
    seconds ``__next__`` spent waiting for the source and placing; ``batch_bytes`` is the size
    of the last host batch (what one step moves from host to device).
    """

    def __init__(self, source: Any, place: Callable[[Any], Any], size: int = 1):
        super().__init__()
        if size < 1:
            raise ValueError(f"device prefetch size must be >= 1, got {size}")
        self.source, self._place, self._size = source, place, size
        self._queue: collections.deque = collections.deque()  # (source state before the batch, device batch)
        self.data_wait_s = 0.0
        self.batch_bytes = 0

    def _fill(self) -> None:
        while len(self._queue) < self._size:
            state = self.source.get_state()
            try:
                host_batch = next(self.source)
            except StopIteration:
                return
            self.batch_bytes = sum(value.nbytes for value in host_batch.values())
            self._queue.append((state, self._place(host_batch)))

    def __next__(self):
        start = time.perf_counter()
        self._fill()
        if not self._queue:
            raise StopIteration
        _, batch = self._queue.popleft()
        self._fill()  # start the next transfer before the step runs
        self.data_wait_s += time.perf_counter() - start
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._queue[0][0] if self._queue else self.source.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._queue.clear()
        self.source.set_state(state)

    def start_prefetch(self) -> None:
        start = getattr(self.source, "start_prefetch", None)
        if start is not None:
            start()

    def close(self) -> None:
        self._queue.clear()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
