"""Training checkpoints: async orbax saves, resume with corrupt-checkpoint fallback, init_from, preemption.

Layout (``grain_jax/checkpoints.py``): ``WORKDIR/checkpoints/<step>/`` with the
Composite items ``params``, ``opt_state``, ``extra`` (``{step, rng}``) and ``data``
(the grain iterator state, so a resumed run reads exactly the batches an
uninterrupted one would have). Orbax writes each step into a temporary directory
and renames it on commit, and prunes old steps (``keep_checkpoints``) only after
the new one has committed, so the last good checkpoint always survives a crash.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
from typing import Any, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from grain_jax import checkpoints, sharding
from grain_jax.train import disk_space, integrity
from grain_jax.train.state import TrainState

CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointMismatch(ValueError):
    """A readable checkpoint that does not fit this run (model shapes, run settings): nothing is moved."""


# Settings a checkpoint's data position depends on: a different value is a mismatch, not a resume.
RUN_KEYS = ("global_batch_size", "seed")
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _shape_mismatches(metadata: Any, abstract: Any, name: str) -> list[str]:
    """Differences between a saved item's tree metadata and the abstract tree this run wants."""
    saved = jax.tree_util.tree_leaves_with_path(metadata.tree)
    wanted = jax.tree_util.tree_leaves_with_path(abstract)
    if name == "params":  # dict trees: compare by path, naming each parameter
        saved_shapes = {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in saved}
        wanted_shapes = {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in wanted}
        problems = [f"params{k} is missing from the checkpoint" for k in wanted_shapes if k not in saved_shapes]
        problems += [f"params{k} is in the checkpoint but not in this model" for k in saved_shapes
                     if k not in wanted_shapes]
        problems += [f"params{k} has shape {saved_shapes[k]} in the checkpoint, this model has {shape}"
                     for k, shape in wanted_shapes.items() if k in saved_shapes and saved_shapes[k] != shape]
        return problems
    # Optimizer states are saved as lists (namedtuples are not kept): compare leaf by leaf.
    if len(saved) != len(wanted):
        return [f"{name} has {len(saved)} arrays in the checkpoint, this run's optimizer has {len(wanted)}"]
    return [f"{name}{jax.tree_util.keystr(path)} has shape {tuple(s.shape)} in the checkpoint, this run has {w.shape}"
            for (_, s), (path, w) in zip(saved, wanted) if tuple(s.shape) != tuple(w.shape)]


def data_state_at(fresh_state: dict, batches: int) -> dict:
    """The state of a grain train iterator after ``batches`` batches, from its state before the first.

    The train stream is a function of (seed, process index, process count) and the batch index
    (``grain_jax.data.pipeline``), so the position after step S is batch S of every process's
    stream. ``mp_prefetch`` iterators hand batch i to worker i mod W.
    """
    if set(fresh_state) == {"next_index"}:
        return {"next_index": batches}
    if "iterators_in_use_states" in fresh_state and "next_index_in_cycle" in fresh_state:
        workers = len(fresh_state["iterators_in_use_states"])
        return {**fresh_state, "next_index_in_cycle": batches % workers,
                "iterators_in_use_states": [data_state_at(worker, (batches - w + workers - 1) // workers)
                                            for w, worker in enumerate(fresh_state["iterators_in_use_states"])]}
    raise ValueError(f"cannot re-derive the position of a data iterator with state keys {sorted(fresh_state)}")


class Checkpointer:
    """Saves and restores the train state, the base rng and the data iterator under ``workdir``.

    ``run`` holds the values of ``RUN_KEYS`` for this run; they are saved with every step and a
    checkpoint written with other values is refused (``CheckpointMismatch``).
    """

    def __init__(self, workdir: str, *, keep: int, run: dict[str, int] | None = None):
        self.workdir = workdir
        self.run = dict(run or {})
        # Handlers named up front: item_metadata() of a step needs them before any restore.
        handlers = {name: ocp.StandardCheckpointHandler() for name in ("params", "opt_state", "extra")}
        handlers.update({"data": grain.checkpoint.CheckpointHandler(), integrity.ITEM: ocp.JsonCheckpointHandler()})
        # cleanup_tmp_directories: a save cut short (kill, full disk) leaves <step>.orbax-checkpoint-tmp behind.
        self.manager = checkpoints.manager(workdir, item_handlers=handlers, max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True, cleanup_tmp_directories=True)
        self._pending = (None, 0)  # (step, bytes) of the async save in flight; its errors surface later

    def save(self, state: TrainState, rng: jax.Array, data_iterator: Any) -> None:
        """Starts an async save of ``state`` at ``state.step`` (returns before the write finishes)."""
        step = int(state.step)
        extra = {"step": np.int64(step), "rng": np.asarray(jax.device_get(rng)),
                 **{key: np.int64(value) for key, value in self.run.items()}}
        digests = integrity.digests(dict(zip(integrity.CHECKED_ITEMS, (state.params, state.opt_state, extra))))
        needed = disk_space.bytes_to_write(state.params, state.opt_state)
        self.wait()  # the previous save's errors (e.g. a full disk) are reported for its own step
        disk_space.check_free_space(str(self.manager.directory), step, needed)
        with disk_space.disk_full_as_error(str(self.manager.directory), step, needed):
            self.manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                extra=ocp.args.StandardSave(extra),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                **{integrity.ITEM: ocp.args.JsonSave(digests)}))
        self._pending = (step, needed)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def quarantined_steps(self) -> list[int]:
        """Steps moved to ``WORKDIR/corrupt_checkpoints/`` (by this or an earlier run)."""
        directory = os.path.join(self.workdir, CORRUPT_DIR)
        return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []

    def _check(self, step: int, abstract: TrainState) -> dict:
        """Reads step's metadata and ``extra``; raises CheckpointMismatch if it does not fit this run.

        Read errors propagate (the caller quarantines); returns ``extra``.
        """
        metadata = self.manager.item_metadata(step)
        problems = (_shape_mismatches(metadata["params"], abstract.params, "params")
                    + _shape_mismatches(metadata["opt_state"], abstract.opt_state, "opt_state"))
        extra = self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.StandardRestore()))["extra"]
        problems += [f"{key}={int(extra[key])} in the checkpoint, {value} in this run" for key, value in self.run.items()
                     if key in extra and int(extra[key]) != value]
        if problems:
            raise CheckpointMismatch(
                f"checkpoint step {step} under {self.manager.directory} does not fit this run (nothing was moved; "
                f"use the matching config, or another --workdir): " + "; ".join(problems[:5])
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return extra

    def _saved_process_counts(self, step: int) -> set[int]:
        directory = os.path.join(str(self.manager.directory), str(step), "data")
        names = os.listdir(directory) if os.path.isdir(directory) else []
        return {int(match.group(2)) for match in map(_DATA_FILE.fullmatch, names) if match}

    def restore(self, state: TrainState, shardings: TrainState,
                data_iterator: Any) -> tuple[TrainState, np.ndarray] | None:
        """Restores the newest readable checkpoint onto ``shardings`` (any mesh), or None if there is none.

        A step that fails to read (truncated or corrupt files) or whose arrays differ from
        their save-time digests (``grain_jax.train.integrity``) is moved to
        ``WORKDIR/corrupt_checkpoints/`` with a warning and the previous one is tried. A readable
        step that does not fit (``_check``) raises ``CheckpointMismatch`` and moves nothing.
        ``data_iterator`` (not yet read from) is positioned in place: from the saved iterator state
        when the checkpoint was written by as many processes as this run has, else re-derived
        (``data_state_at``) from the step: every process continues its own stream at batch ``step``.

        Returns:
          ``(state, rng)`` where ``rng`` is the saved base key data.
        """
        abstract = sharding.abstract_arrays(state, shardings)
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            checked = os.path.isdir(os.path.join(str(self.manager.directory), str(step), integrity.ITEM))
            try:
                extra = self._check(step, abstract)
                saved_counts = self._saved_process_counts(step)
                same_layout = jax.process_count() in saved_counts or not saved_counts  # no files: corrupt, read fails
                items = dict(params=ocp.args.StandardRestore(abstract.params),
                             opt_state=ocp.args.StandardRestore(abstract.opt_state),
                             extra=ocp.args.StandardRestore(),
                             **({integrity.ITEM: ocp.args.JsonRestore()} if checked else {}))
                if same_layout:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except CheckpointMismatch:
                raise
            except Exception as error:  # noqa: BLE001  (any read failure means: unusable step)
                self._skip(step, type(error).__name__, error)
                continue
            try:
                verified = checked and integrity.verify(
                    restored[integrity.ITEM], {item: restored[item] for item in integrity.CHECKED_ITEMS}, step)
            except integrity.IntegrityError as error:
                self._skip(step, str(error), error)
                continue
            if not verified:
                print(f"WARNING: checkpoint step {step} has no integrity digests this version can check (saved by "
                      "another version); restoring it unverified", flush=True)
            saved_step = int(extra["step"])
            if same_layout:
                data = f"restored from the checkpoint (written by {jax.process_count()} process(es), as many as now)"
            else:
                data_iterator.set_state(data_state_at(data_iterator.get_state(), saved_step))
                data = (f"re-derived: the checkpoint was written by {'/'.join(map(str, sorted(saved_counts)))} "
                        f"process(es), this run has {jax.process_count()}; every process continues its own data "
                        f"stream at batch {saved_step}")
            message = (f"resumed step {saved_step}: params, optimizer state and rng restored (onto this run's "
                       f"shardings); data position {data}")
            logging.info(message)
            if jax.process_index() == 0:
                print(message, flush=True)
            restored_state = TrainState(step=jax.device_put(np.int32(saved_step), shardings.step),
                                        params=restored["params"], opt_state=restored["opt_state"])
            return restored_state, np.asarray(extra["rng"])
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} under {self.manager.directory} could be read")
        return None

    def _skip(self, step: int, reason: str, error: Exception) -> None:
        logging.warning("checkpoint step %d under %s is unreadable (%s: %s); falling back to the previous one",
                        step, self.manager.directory, type(error).__name__, error)
        print(f"WARNING: checkpoint step {step} is unreadable ({reason}); "
              f"moving it to {os.path.join(self.workdir, CORRUPT_DIR)} and trying the previous one", flush=True)
        self._quarantine(step)

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, CORRUPT_DIR, str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(str(self.manager.directory), str(step)), target)
        multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        """Waits for the async save in flight; raises ``DiskFullError`` if it ran out of space."""
        step, needed = self._pending
        with disk_space.disk_full_as_error(str(self.manager.directory), step, needed):
            self.manager.wait_until_finished()
        self._pending = (None, 0)

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (multi-process runs with the preemption service, e.g. TPU pods)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


def load_init_params(init_from: str, params: Any, shardings: Any, dont_load: Sequence[str] = ()) -> Any:
    """Loads ``params`` from the checkpoint directory ``init_from`` (``config.init_from``).

    Leaves whose "/"-joined path fully matches a ``dont_load`` regex keep their fresh
    initialisation (e.g. ``"decoder/.*"`` to start GRAIN from CLIP towers); every other
    leaf must exist in the checkpoint with the same shape. Loaded leaves land directly
    on ``shardings``.
    """
    skip = [re.compile(pattern) for pattern in dont_load]
    fresh = traverse_util.flatten_dict(params, sep="/")
    target_shardings = traverse_util.flatten_dict(shardings, sep="/")
    with ocp.CheckpointManager(os.path.join(os.path.abspath(init_from), checkpoints.CHECKPOINTS),
                               # PyTree (not Standard) handler: only it accepts PLACEHOLDER leaves.
                               item_handlers={"params": ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"config.init_from={init_from!r} holds no checkpoint steps")
        saved = traverse_util.flatten_dict(dict(mngr.item_metadata(step)["params"].tree), sep="/")
        wanted, problems = {}, []
        for path, leaf in fresh.items():
            if any(p.fullmatch(path) for p in skip):
                continue
            if path not in saved:
                problems.append(f"{path} is missing from the checkpoint")
            elif tuple(saved[path].shape) != leaf.shape:
                problems.append(f"{path} has shape {tuple(saved[path].shape)} in the checkpoint, model wants {leaf.shape}")
            else:
                wanted[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target_shardings[path])
        if problems:
            raise ValueError(f"cannot initialise from {init_from!r} (add the paths to config.dont_load to keep them "
                             "freshly initialised):\n  " + "\n  ".join(problems))
        # Leaves we do not want are skipped with orbax's PLACEHOLDER (never read).
        abstract = traverse_util.unflatten_dict({path: wanted.get(path, ocp.PLACEHOLDER) for path in saved}, sep="/")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        loaded = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args)))["params"]
    loaded = traverse_util.flatten_dict(loaded, sep="/")
    merged = {path: loaded[path] if path in wanted else leaf for path, leaf in fresh.items()}
    logging.info("init_from %s step %d: loaded %d arrays, kept %d fresh", init_from, step, len(wanted),
                 len(fresh) - len(wanted))
    return traverse_util.unflatten_dict(merged, sep="/")


class SigtermFlag:
    """Set by SIGTERM (single-process runs; multi-process runs use JAX's preemption service instead)."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True
        logging.warning("SIGTERM received: will save a checkpoint at the next step boundary and exit")

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
