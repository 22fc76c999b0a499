"""Metric sinks (TensorBoard events via tensorboardX, ``metrics.jsonl``, console) and MFU.

Only process 0 writes; other processes get a writer whose methods do nothing
but keep the same call sites.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Matched against
# ``jax.Device.device_kind`` (e.g. "NVIDIA H100 80GB HBM3" = SXM, "NVIDIA H100 PCIe") in order,
# so more specific names come first.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM
    ("b200", 2250e12),
    ("a100", 312e12),  # SXM and PCIe alike
    ("l40s", 362e12),
    ("l4", 121e12),
)


def peak_flops(devices: list[jax.Device]) -> float | None:
    """Peak FLOP/s of ``devices`` together, or None on CPU: a CPU has no stable peak (clock boost, SIMD
    width, cores shared with data workers and other jobs), so CPU runs report achieved FLOP/s, no MFU."""
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        return None
    for name, flops in PEAK_FLOPS_PER_DEVICE:
        if name in kind:
            return flops * len(devices)
    raise KeyError(f"no peak FLOP/s known for device kind {devices[0].device_kind!r}; "
                   f"add it to grain_jax.train.metrics.PEAK_FLOPS_PER_DEVICE")


def model_flops_per_step(train_step, abstract_args: tuple, mesh, rules: tuple) -> float:
    """Model FLOPs of one optimizer step over all devices, for MFU.

    ``train_step`` must be the step without rematerialisation and without gradient accumulation
    (``grad_accum_steps=1``): recomputed activations are not useful work, and XLA's cost analysis
    counts a loop body (the accumulation scan) once, not once per micro-batch. The step is lowered,
    not compiled: the unpartitioned program counts the whole global batch.
    """
    import flax.linen as nn
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jax.jit(train_step).lower(*abstract_args)
    analysis = lowered.cost_analysis()
    if analysis is None:
        # PJRT plugins (TPU, GPU, compile-only TPU topologies) do not analyse unoptimised HLO; XLA's
        # HloCostAnalysis is platform-independent, so the CPU client counts the same program. jax has no
        # public entry point for it.
        from jax._src.lib import _jax
        analysis = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                                 lowered.compiler_ir("hlo").as_hlo_module())
    return float(analysis.get("flops", 0.0))


def compiled_flops(compiled: jax.stages.Compiled, num_devices: int) -> float:
    """FLOPs XLA counts in one call of ``compiled`` over all devices (cost analysis is per device).

    Counts remat recompute and only one iteration of any loop: use ``model_flops_per_step`` for MFU.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)) * num_devices


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricWriter:
    """Scalars to ``workdir/tensorboard`` (event files), ``workdir/metrics.jsonl`` and the log."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if self.enabled:
            from tensorboardX import SummaryWriter
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(self.tensorboard_dir)
            self._jsonl = open(self.jsonl_path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


class Throughput:
    """Step time, examples/s, MFU and ETA between two log points.

    With ``data`` (an iterator with ``data_wait_s`` and ``batch_bytes``, e.g.
    ``loader.DevicePrefetch``) also the input pipeline's share, open_clip's ``data_time``:
    ``perf/data_time_s`` (seconds per step the loop waited for its batch),
    ``perf/data_wait_fraction`` (of the step time) and ``perf/host_to_device_mib`` per step.
    """

    def __init__(self, *, total_steps: int, global_batch_size: int, flops_per_step: float, peak: float | None,
                 first_step: int, data=None):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.flops_per_step = flops_per_step
        self.peak = peak
        self.data = data
        self.reset(first_step)

    def _data_wait(self) -> float:
        return self.data.data_wait_s if self.data is not None else 0.0

    def reset(self, step: int) -> None:
        """Restart the clock (after evaluation or checkpointing, which are not training time)."""
        self._last_step, self._last_time, self._last_wait = step, time.perf_counter(), self._data_wait()

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - self._last_step
        if steps <= 0:
            return {}
        step_time = (now - self._last_time) / steps
        wait = self._data_wait()
        data_time = (wait - self._last_wait) / steps
        self._last_step, self._last_time, self._last_wait = step, now, wait
        measured = {"perf/step_time_s": step_time,
                    "perf/steps_per_s": 1.0 / step_time,
                    "perf/examples_per_s": self.global_batch_size / step_time,
                    "perf/flops_per_s": self.flops_per_step / step_time,
                    "perf/eta_s": (self.total_steps - step) * step_time}
        if self.peak:
            measured["perf/mfu"] = self.flops_per_step / step_time / self.peak
        if self.data is not None:
            measured.update({"perf/data_time_s": data_time, "perf/data_wait_fraction": data_time / step_time,
                             "perf/host_to_device_mib": self.data.batch_bytes / 2**20})
        return measured


def console_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
    """``step 120/1000 (12%) | loss 3.21 | ... | 5.1 ex/s | MFU 12.3% | ETA 0:04:10`` (on CPU, which has no
    stable peak, ``41.2 GFLOP/s`` in place of the MFU)."""
    parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%)"]
    parts += [f"{name.split('/', 1)[-1] if name.startswith('loss/') else name} {value:.4g}"
              for name, value in scalars.items() if name.startswith(("loss/", "acc/"))]
    if "perf/examples_per_s" in scalars:
        compute = (f"MFU {100 * scalars['perf/mfu']:.2f}%" if "perf/mfu" in scalars
                   else f"{scalars['perf/flops_per_s'] / 1e9:.1f} GFLOP/s")
        parts += [f"{scalars['perf/examples_per_s']:.1f} ex/s", compute]
        if "perf/data_wait_fraction" in scalars:
            parts.append(f"data wait {100 * scalars['perf/data_wait_fraction']:.1f}%")
        parts.append(f"ETA {format_duration(scalars['perf/eta_s'])}")
    return " | ".join(parts)


def mean_metrics(per_step: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Averages each metric over the steps since the last log (keys from the first step)."""
    return {k: float(np.mean([m[k] for m in per_step])) for k in per_step[0]}


def grouped_lines(scalars: Mapping[str, float]) -> str:
    """Evaluation results, one indented line per metric group (``eval/0shot/synthetic_novel/alpha0.5``):
    ``  eval/0shot/synthetic_novel/alpha0.5  top1 0.152 | top5 0.672``."""
    groups: dict[str, list[str]] = {}
    for name, value in scalars.items():
        group, _, metric = name.rpartition("/")
        groups.setdefault(group, []).append(f"{metric} {value:.4g}")
    width = max(len(group) for group in groups) if groups else 0
    return "\n".join(f"  {group:<{width}}  {' | '.join(parts)}" for group, parts in groups.items())


def last_logged(jsonl_path: str, step: int) -> dict[str, float]:
    """The last training record (one with ``loss/total``) at or before ``step`` in ``metrics.jsonl``
    (without its ``step``), or {} when there is none."""
    if not os.path.exists(jsonl_path):
        return {}
    found: dict[str, float] = {}
    with open(jsonl_path) as f:
        for line in f:
            record = json.loads(line)
            if "loss/total" in record and record.get("step", 0) <= step:
                found = {k: v for k, v in record.items() if k != "step"}
    return found
