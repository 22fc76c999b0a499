"""``train_and_evaluate(config, workdir)``: the one GRAIN / CLIP training loop.

Order of events:
  1. resolve the data (``resolve_data``: ``config.data.dir`` None = the embedded synthetic
     benchmark, generated into ``config.data_cache_dir``, default ``WORKDIR/data``), durations and schedule;
  2. build the mesh and initialise the state sharded over it;
  3. resume: the workdir's newest readable checkpoint -> ``config.init_from`` -> scratch;
  4. AOT-compile the train step (memory analysis and FLOPs logged); with ``config.data.text_length_buckets``
     at the full text lengths (the worst case) first, and once more for each shorter length a batch is cut to;
  5. loop: step, log every ``log_every_steps``, checkpoint every ``checkpoint_every_steps``,
     evaluate every evaluator's ``every_steps``; on SIGTERM / preemption save and return;
  6. checkpoint, run every evaluator, print where everything is.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import parameter_overview
from jax.sharding import Mesh

from grain_jax import checkpoints, sharding
from grain_jax.batch import abstract_batch
from grain_jax.data import loader, resolve
from grain_jax.models import text_batching
from grain_jax.train import (config_checks, metrics as metrics_lib, optimizer, resume, state as state_lib,
                             step as step_lib)

FINAL_METRICS = "final_metrics.json"


def _say(message: str) -> None:
    """One progress line: a log record, which the binary's console shows (grain_jax.cli.console)."""
    logging.info(message)


def _stop_profile(state, start: int, step: int, workdir: str) -> bool:
    """Ends the jax.profiler trace of steps [start, step) once their work is done; returns False (not profiling)."""
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    _say(f"profile of steps [{start}, {step}) in {os.path.join(workdir, 'profile')}")
    return False


def resolve_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``data_cache_dir`` and ``data.dir`` are set.

    ``data_cache_dir`` (where data made for the run goes; evaluator entries may refer to it) defaults to
    ``WORKDIR/data``; ``data.dir`` None is resolved by the data layer (``data.resolve``: the embedded
    benchmark of ``config.synthetic``). Evaluator entries with a ``data.dir`` of None read ``data.dir``.
    """
    config = copy.deepcopy(config)  # keeps the config's field references (evaluator entries that follow a key)
    if config.get("data_cache_dir") is None:
        with config.unlocked():
            config.data_cache_dir = os.path.join(workdir, "data")
    config.data.dir = resolve.data_dir(config.data.dir, config.get("synthetic"), config.data_cache_dir)
    for evaluator in config.get("evals", {}).values():
        if "data" in evaluator and evaluator.data.get("dir") is None:
            evaluator.data.dir = config.data.dir
    return ml_collections.ConfigDict(config.to_dict())


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks the config before anything expensive runs; raises ValueError naming the key."""
    config_checks.check_values(config)
    num_devices = jax.device_count() if num_devices is None else num_devices
    dcn = tuple(config.get("dcn_mesh_shape") or (1, 1, 1))
    per_slice = sharding.resolve_mesh_shape(config.mesh_shape, num_devices // int(np.prod(dcn)))
    axis_sizes = {axis: ici * slices for axis, ici, slices in zip(sharding.MESH_AXES, per_slice, dcn)}
    rules = sharding.axis_rules(config.get("sharding_rules") or ())
    batch_shards = sharding.batch_shards(axis_sizes, rules)
    accum = int(config.get("grad_accum_steps", 1))
    if config.global_batch_size <= 0 or config.global_batch_size % (batch_shards * accum):
        axes = " x ".join(sharding.logical_mesh_axes("batch", rules)) or "batch replicated"
        raise ValueError(f"global_batch_size={config.global_batch_size} must be a positive multiple of the "
                         f"batch shards ({batch_shards} = {axes}) times grad_accum_steps ({accum})")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    for prefix in ("total", "warmup"):
        for unit in optimizer.DURATION_UNITS:
            value = config.get(f"{prefix}_{unit}")
            if value is not None and (value < 0 or (prefix == "total" and value == 0)):
                raise ValueError(f"config.{prefix}_{unit} must be positive, got {value}")
    if config.model.get("num_queries") is not None and config.model.num_queries < 1:
        raise ValueError(f"config.model.num_queries must be >= 1, got {config.model.num_queries}")
    if config.data.max_boxes < 1:
        raise ValueError(f"config.data.max_boxes must be >= 1, got {config.data.max_boxes}")
    groups = config.loss.get("negative_groups", 1)
    if config.loss.get("description_negatives") == "per_device" and config.global_batch_size % groups:
        raise ValueError(f"config.loss.negative_groups={groups} must divide global_batch_size="
                         f"{config.global_batch_size}")
    if config.wd_rule not in optimizer.WD_RULES:
        raise ValueError(f"config.wd_rule must be one of {sorted(optimizer.WD_RULES)}, got {config.wd_rule!r}")


def schedule_from_config(config: ml_collections.ConfigDict, *, total_steps: int,
                         warmup_steps: int) -> optax.Schedule:
    """``optimizer.make_schedule`` with ``config.lr``, ``lr_start``, ``lr_end``."""
    return optimizer.make_schedule(lr=config.lr, lr_start=config.lr_start, lr_end=config.lr_end,
                                   total_steps=total_steps, warmup_steps=warmup_steps)


def optimizer_from_config(config: ml_collections.ConfigDict, params, schedule: optax.Schedule
                          ) -> optax.GradientTransformation:
    """``optimizer.make_optimizer`` with ``config.weight_decay``, ``wd_rule``, ``adam``, ``grad_clip_norm`` and
    ``lr_multipliers``."""
    return optimizer.make_optimizer(params, schedule, weight_decay=config.weight_decay, wd_rule=config.wd_rule,
                                    b1=config.adam.b1, b2=config.adam.b2, eps=config.adam.eps,
                                    grad_clip_norm=config.get("grad_clip_norm"),
                                    lr_multipliers=tuple(config.get("lr_multipliers") or ()))


def check_sufficiently_sharded(state, config) -> float:
    """Warns or raises (``config.sharding_check``) when params + optimizer state are too replicated."""
    check = config.get("sharding_check") or {}
    excess, replicated = sharding.sharding_excess({"params": state.params, "opt_state": state.opt_state})
    limit, action = check.get("max_excess"), check.get("action", "warn")
    if action not in ("warn", "fail"):
        raise ValueError(f"config.sharding_check.action must be 'warn' or 'fail', got {action!r}")
    if limit is not None and excess > limit:
        largest = ", ".join(f"{path} ({size / 2**20:.1f} MiB)" for path, size in replicated[:3])
        message = (f"params + optimizer state use {100 * excess:.1f}% more bytes per device than fully sharded over "
                   f"(fsdp, tensor), above config.sharding_check.max_excess={limit}; largest replicated: {largest}")
        if action == "fail":
            raise ValueError(message)
        _say(f"WARNING: {message}")
    return excess


def abstract_step_inputs(state, shardings, batch_sh, mesh: Mesh, config, text_lengths: tuple[int, int] | None = None
                         ) -> tuple:
    """``(state, batch, rng)`` of the train step as ``ShapeDtypeStruct``s with their shardings.

    ``text_lengths``: the batch's (caption, description) token lengths; None: the config's full ones.
    """
    data = config.data
    caption_length, description_length = text_lengths or (data.caption_length, data.description_length)
    batch_shapes = abstract_batch(config.global_batch_size, data.image_size, caption_length, description_length,
                                  data.max_boxes, batch_sh)
    abstract_state = sharding.abstract_arrays(state, shardings)
    return abstract_state, batch_shapes, jax.ShapeDtypeStruct((2,), np.uint32, sharding=state_lib.replicated(mesh))


# XLA options for the train step, per platform. On CPU the memory-optimised scheduler orders the step to keep
# fewer buffers alive at once (XLA's default orders for concurrency between threads): the same results bit for
# bit (tests/test_train.py), a quarter less temporary memory and so fewer freshly mapped pages per step
# (docs/performance.md, "XLA:CPU's scheduler"). Elsewhere XLA's defaults stand.
_COMPILER_OPTIONS = {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}}


def compiler_options(platform: str) -> dict[str, str]:
    """The XLA compiler options the train step is compiled with on ``platform`` ("cpu", "gpu", "tpu")."""
    return dict(_COMPILER_OPTIONS.get(platform, {}))


def compile_train_step(train_step, state, shardings, batch_sh, mesh: Mesh, rules: tuple, config,
                       text_lengths: tuple[int, int] | None = None):
    """AOT-compiles the step for this config's batch shapes (``text_lengths``: as ``abstract_step_inputs``);
    logs its memory analysis."""
    repl = state_lib.replicated(mesh)
    jitted = jax.jit(train_step, in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
                     donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = jitted.lower(*abstract_step_inputs(state, shardings, batch_sh, mesh, config,
                                                      text_lengths)).compile(
            compiler_options(mesh.devices.flat[0].platform))
    memory = compiled.memory_analysis()
    if memory is not None:
        texts = "" if text_lengths is None else " for texts of {} (captions) / {} (descriptions) tokens".format(
            *text_lengths)
        _say(f"compiled train step{texts} in {time.perf_counter() - start:.1f}s; per device: "
             f"arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
             f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB, "
             f"outputs {memory.output_size_in_bytes / 2**20:.1f} MiB (donated {memory.alias_size_in_bytes / 2**20:.1f})")
    return compiled


class TrainSteps:
    """The train step compiled once per kind of batch: its text lengths (``config.data.text_length_buckets``)
    and whether its descriptions fit ``model.description_budget``'s packed rows.

    ``compile_fn(text_lengths, packed)`` -> executable; ``(None, True)`` is the config's full lengths with
    packing as configured, compiled up front; any shorter (caption, description) lengths, or a batch over
    the description budget (the model with every slot encoded), on first use. Each goes through the
    persistent compilation cache, so a restarted run loads every one of them.
    """

    def __init__(self, compile_fn, config):
        self._compile = compile_fn
        self._steps = {(config.data.caption_length, config.data.description_length, True): compile_fn(None, True)}

    def for_batch(self, batch: dict, packed: bool = True):
        """The executable for ``batch``'s text lengths and packing (compiled now if it is the first such batch)."""
        key = (batch["caption_tokens"].shape[-1], batch["description_tokens"].shape[-1], packed)
        if key not in self._steps:
            self._steps[key] = self._compile(key[:2], packed)
        return self._steps[key]


def model_flops_per_step(config, tx, schedule, state, shardings, batch_sh, mesh: Mesh, rules: tuple) -> float:
    """The step's model FLOPs (MFU's numerator): the same model without remat and unrolled, one micro-batch of
    the global batch, texts at the config's full lengths (with ``data.text_length_buckets`` an upper bound)."""
    from grain_jax.losses import LossConfig
    from grain_jax.models import scan
    plain = ml_collections.ConfigDict(config.to_dict())
    plain.model.remat_policy = "none"
    abstract_state, *inputs = abstract_step_inputs(state, shardings, batch_sh, mesh, config)
    if plain.model.get("scan_layers"):  # XLA's cost analysis counts a scanned block once, not once per layer
        plain.model.scan_layers = False
        params = scan.unstack_layers(abstract_state.params)
        tx = optimizer_from_config(config, params, schedule)
        abstract_state = state_lib.TrainState(step=abstract_state.step, params=params,
                                              opt_state=jax.eval_shape(tx.init, params))
    step = step_lib.make_train_step(state_lib.build_model(plain), LossConfig(**config.loss), tx, schedule, 1,
                                   mean=config.data.mean, std=config.data.std)
    return metrics_lib.model_flops_per_step(step, (abstract_state, *inputs), mesh, rules)


def _use_compilation_cache(config, workdir: str) -> None:
    """A restart (after preemption) loads the compiled step instead of recompiling it."""
    directory = config.get("compilation_cache_dir")
    if jax.config.jax_compilation_cache_dir or directory == "":
        return  # already chosen (JAX_COMPILATION_CACHE_DIR, the caller) or off
    jax.config.update("jax_compilation_cache_dir", directory or os.path.join(workdir, "compilation_cache"))


def _barrier(name: str) -> None:
    """Waits for every process (multi-process runs only).

    Processes reach the same point at different times, and the first cross-process collective
    (gloo on CPU) only waits 30 s for the others; a coordination-service barrier waits longer.
    """
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name, timeout=3600, processes=set(range(jax.process_count())))


def _restore_or_init(config, workdir, state, shardings, data_iterator, train_rng, ckpt, fresh_start: bool):
    """Resume order: the workdir's newest readable checkpoint -> config.init_from -> scratch.

    A workdir whose checkpoints were all quarantined as unreadable does not silently start over
    (a requeued job would lose the run): that needs ``fresh_start``.
    """
    restored = ckpt.restore(state, shardings, data_iterator)
    if restored is not None:
        state, rng_data = restored
        _say(f"resumed from {os.path.join(workdir, checkpoints.CHECKPOINTS)} at step {int(state.step)}")
        return state, jax.device_put(rng_data, state_lib.replicated(shardings.step.mesh))
    quarantined = ckpt.quarantined_steps()
    if quarantined and not fresh_start:
        raise RuntimeError(f"{workdir} has no usable checkpoint: steps {quarantined} were unreadable and are in "
                           f"{os.path.join(workdir, resume.CORRUPT_DIR)}; pass --fresh_start to train from "
                           f"scratch anyway")
    if config.get("init_from"):
        params = resume.load_init_params(config.init_from, state.params, shardings.params,
                                                config.get("dont_load") or ())
        _say(f"initialised parameters from {config.init_from} (kept fresh: {list(config.get('dont_load') or [])})")
        return state.replace(params=params), train_rng
    _say("training from scratch")
    return state, train_rng


def _run_evaluators(evaluators, inference_model, step: int, writer: metrics_lib.MetricWriter,
                    only_due: bool) -> dict[str, float]:
    results = {}
    for name, evaluator, every_steps, prefix in evaluators:
        if only_due and (every_steps <= 0 or step % every_steps):
            continue
        start = time.perf_counter()
        values = {prefix + metric: float(value) for metric, value in evaluator.run(inference_model)}
        writer.write_scalars(step, values)
        _say(f"eval {name} at step {step} ({time.perf_counter() - start:.1f}s):\n"
             + metrics_lib.grouped_lines(values))
        results.update(values)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, fresh_start: bool = False
                       ) -> dict[str, float]:
    """Trains (resuming if ``workdir`` has checkpoints) and evaluates; returns the last logged metrics.

    ``fresh_start``: train from scratch even if every checkpoint in ``workdir`` was unreadable.
    """
    from grain_jax.data import pipeline
    from grain_jax.evaluators import from_config
    from grain_jax.inference import InferenceModel, objective
    from grain_jax.losses import LossConfig

    workdir = os.path.abspath(workdir)
    _use_compilation_cache(config, workdir)
    validate_config(config)
    config = resolve_data(config, workdir)
    mesh = sharding.create_mesh(config.mesh_shape, config.get("dcn_mesh_shape"))
    rules = sharding.axis_rules(config.get("sharding_rules") or ())
    spec = state_lib.model_spec(config)
    if jax.process_index() == 0:
        checkpoints.write_model_spec(workdir, spec)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    num_train = pipeline.num_records(config.data)
    sizes = dict(num_train_examples=num_train, global_batch_size=config.global_batch_size)
    total_steps = optimizer.steps_from_duration(config, "total", **sizes)
    warmup_steps = optimizer.steps_from_duration(config, "warmup", default=0, **sizes)
    config_checks.check_warmup(config, warmup_steps, total_steps)
    schedule = schedule_from_config(config, total_steps=total_steps, warmup_steps=warmup_steps)
    _say(f"{num_train} training records, global batch {config.global_batch_size}: {total_steps} steps "
         f"({warmup_steps} warmup); mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
         f"devices in {jax.process_count()} process(es)")

    model = state_lib.build_model(config)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state, shardings, tx = state_lib.create_train_state(
        model, lambda params: optimizer_from_config(config, params, schedule), mesh, rules, init_rng)
    _say(f"model {config.model_name}: {state_lib.count_params(state.params) / 1e6:.2f} M parameters")
    check_sufficiently_sharded(state, config)
    parameter_overview.log_parameter_overview(state.params, include_stats=False, max_lines=200,
                                              jax_logging_process=0)

    batch_sh = sharding.batch_sharding(mesh, rules)
    host_batches = pipeline.make_train_iterator(config.data, global_batch_size=config.global_batch_size,
                                                seed=config.seed)
    # The next global batch is transferred while the current step runs; its state is the host
    # iterator's before the batches still queued, so checkpoints resume at the step's next batch.
    loss_config = LossConfig(**config.loss)
    buckets = config.data.get("text_length_buckets") or ()
    text_keys = objective.text_keys(model, loss_config)
    budget = getattr(model, "description_budget", 1.0)

    def place(host_batch):  # -> (global batch, whether its descriptions fit the packed rows)
        fitted, packed = text_batching.fit_batch(host_batch, buckets, text_keys, budget)
        return pipeline.to_global(fitted, batch_sh), packed

    data_iterator = loader.DevicePrefetch(host_batches, place)
    _barrier("grain_jax_state_initialised")  # the checkpoint manager's first (gloo) collective waits only 30 s
    ckpt = resume.Checkpointer(workdir, keep=config.keep_checkpoints,
                               run={key: config[key] for key in resume.RUN_KEYS})
    state, train_rng = _restore_or_init(config, workdir, state, shardings, data_iterator, train_rng, ckpt,
                                        fresh_start)
    train_rng = jax.device_put(train_rng, state_lib.replicated(mesh))  # where the step wants it (transfer guard)
    _say(f"input pipeline: {host_batches.num_workers} worker process(es)")
    final_path = os.path.join(workdir, FINAL_METRICS)
    if int(state.step) >= total_steps and os.path.exists(final_path):
        # A rerun of a finished command: keep its results (no second evaluation, nothing overwritten).
        ckpt.close()
        with open(final_path) as f:
            final = json.load(f)
        _say(f"already finished: step {int(state.step)} of {total_steps}; results in {final_path}")
        return {k: v for k, v in final.items() if k != "step"}

    def compile_step(lengths, packed):
        step_model = model if packed else model.every_description_slot()
        if not packed:
            _say(f"a batch holds more valid descriptions than model.description_budget={budget} packs: compiling "
                 "the step that encodes every description slot (counted in txt/description_overflow)")
        train_step = step_lib.make_train_step(step_model, loss_config, tx, schedule,
                                              int(config.get("grad_accum_steps", 1)), mean=config.data.mean,
                                              std=config.data.std,
                                              grad_reduce_dtype=config.get("grad_reduce_dtype", "compute"))
        return compile_train_step(train_step, state, shardings, batch_sh, mesh, rules, config, lengths)

    steps = TrainSteps(compile_step, config)
    _barrier("grain_jax_train_step_compiled")
    evaluators = from_config(config.get("evals"))
    writer = metrics_lib.MetricWriter(workdir)
    step = int(state.step)
    throughput = metrics_lib.Throughput(
        total_steps=total_steps, global_batch_size=config.global_batch_size, first_step=step,
        flops_per_step=model_flops_per_step(config, tx, schedule, state, shardings, batch_sh, mesh, rules),
        peak=metrics_lib.peak_flops(jax.devices()), data=data_iterator)

    def inference_model():
        return InferenceModel(model, state.params, spec, mesh, rules=config.get("sharding_rules") or ())

    pending: list[dict] = []
    overflowed: list[float] = []  # per pending step: 1.0 when its batch was over the description budget
    # The training metrics last logged: resuming at the end (killed during the final evaluation) still
    # reports them in final_metrics.json.
    last: dict[str, float] = metrics_lib.last_logged(writer.jsonl_path, step) if step >= total_steps else {}

    def flush_metrics():
        """Fetches the metrics of the steps since the last flush; stops on a non-finite step."""
        nonlocal pending, last
        if not pending:
            return
        fetched = jax.device_get(pending)
        if budget < 1:  # decided on the host (text_batching.fit_batch): the fraction of steps encoded in full
            fetched = [{**m, "txt/description_overflow": o} for m, o in zip(fetched, overflowed)]
        pending, overflowed[:] = [], []
        bad = [i for i, m in enumerate(fetched) if m["finite"] < 1]
        if bad:
            ckpt.wait()
            first = fetched[bad[0]]
            names = sorted(k for k, v in first.items() if k != "finite" and not np.all(np.isfinite(v)))
            saved = ckpt.latest_step()
            where = (f"the last good checkpoint is step {saved} in {os.path.join(workdir, checkpoints.CHECKPOINTS)}"
                     if saved is not None else "no checkpoint was saved yet")
            raise FloatingPointError(
                f"non-finite {', '.join(names)} at step {step - len(fetched) + bad[0] + 1} (values: "
                + ", ".join(f"{k} {first[k]}" for k in names) + f"); the update was not applied and training "
                f"stopped; {where}")
        last = {**metrics_lib.mean_metrics(fetched), **throughput.measure(step)}
        last.pop("finite")
        writer.write_scalars(step, last)
        _say(metrics_lib.console_line(step, total_steps, last))

    multi_process = jax.process_count() > 1
    # One process: our own SIGTERM handler. Several: JAX's preemption service owns SIGTERM
    # and `reached_preemption` tells every process the same step to stop at.
    sigterm = contextlib.nullcontext(None) if multi_process else resume.SigtermFlag()
    profile_start, profile_stop = config.get("profile_steps") or (-1, -1)
    profiling = False
    with sigterm as flag:
        while step < total_steps:
            if step == profile_start:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                profiling = True
            batch, packed = next(data_iterator)
            compiled = steps.for_batch(batch, packed)
            with jax.transfer_guard("disallow"):  # every step input is already on device: no hidden copies
                state, step_metrics = compiled(state, batch, train_rng)
            step += 1
            if profiling and step == profile_stop:
                profiling = _stop_profile(state, profile_start, step, workdir)
            pending.append(step_metrics)
            overflowed.append(0.0 if packed else 1.0)
            preempted = (flag is not None and flag.received) or ckpt.reached_preemption(step)
            save = step % config.checkpoint_every_steps == 0 or step == total_steps or preempted
            if step % config.log_every_steps == 0 or save:
                flush_metrics()
            if save:
                ckpt.save(state, train_rng, data_iterator)
            if preempted:
                if profiling:
                    profiling = _stop_profile(state, profile_start, step, workdir)
                ckpt.wait()
                _say(f"preempted: saved checkpoint at step {step} in {os.path.join(workdir, checkpoints.CHECKPOINTS)}; "
                     f"rerun the same command to resume")
                writer.close()
                ckpt.close()
                return last
            if any(every > 0 and step % every == 0 and step < total_steps for _, _, every, _ in evaluators):
                last.update(_run_evaluators(evaluators, inference_model(), step, writer, only_due=True))
                throughput.reset(step)

    if profiling:  # profile_steps reached past the last step
        _stop_profile(state, profile_start, step, workdir)
    if ckpt.latest_step() != step:  # e.g. resumed from the final step; make sure it is on disk
        ckpt.save(state, train_rng, data_iterator)
    last.update(_run_evaluators(evaluators, inference_model(), step, writer, only_due=False))
    ckpt.wait()
    writer.close()
    ckpt.close()
    if jax.process_index() == 0:
        with open(final_path, "w") as f:
            json.dump({"step": step, **last}, f, indent=2)
    headline = {k: v for k, v in last.items()
                 if k == "loss/total" or (k.startswith("eval/") and k.endswith(("/top1", "/loss/total"))
                                          and "/alpha" not in k)}
    _say("final metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in headline.items()))
    tensorboard = f"tensorboard --logdir {writer.tensorboard_dir}"
    if importlib.util.find_spec("tensorboard") is None:
        tensorboard = f"pip install -e '.[tensorboard]' (in the repository), then {tensorboard}"
    console_log = os.path.join(workdir, checkpoints.CONSOLE_LOG)
    _say(f"done: {step} steps. Everything is in {workdir}:\n"
         f"  results      {final_path}, {writer.jsonl_path}\n"
         + (f"  console log  {console_log}\n" if os.path.exists(console_log) else "")
         + f"  checkpoint   {os.path.join(workdir, checkpoints.CHECKPOINTS, str(step))} "
         f"(grain_jax.inference.load({workdir!r}))\n"
         f"  TensorBoard  {tensorboard}")
    return last
