"""Per-category time of one train step, ours (XLA) and PyTorch's, in the same categories.

Used by ``vs_reference.py --profile``. Ours: a ``jax.profiler`` trace of one step with XLA:CPU's per-thunk
trace events (``--xla_cpu_enable_xprof_traceme``, set by :func:`enable_xla_traceme` before JAX starts), each
event mapped to its instruction in the compiled HLO (``Compiled.as_text()``) and categorised by the
instruction's source (``op_name`` metadata) and whether it contains a dot. Theirs: ``torch.profiler``'s
self CPU time per ATen op. Times are summed over threads (parallel work counts once per thread that ran
it), so on a loaded machine they include time a thread was descheduled: compare the shares.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

CATEGORIES = ("linear layers (dense, patch conv)", "attention core (QK, mask, softmax, PV)", "layernorm",
              "MLP activation (+ bias)", "embedding (lookup, gradient)", "optimizer (AdamW)",
              "copies / transposes / fills", "other (residual adds, loss, pooling)")
LINEAR, ATTENTION, NORM, ACTIVATION, EMBEDDING, OPTIMIZER, COPY, OTHER = CATEGORIES
_NORM = re.compile(r"/(norm\d?|norm_pre|ln_\w+|[qk]_norm)/")
_ATTENTION_EINSUM = re.compile(r"hqk|qhd,\.\.\.khd")  # the QK^T and PV einsums (projections are ...whd / hdw)


def enable_xla_traceme() -> None:
    """Adds XLA:CPU's per-thunk trace events to ``XLA_FLAGS``; call before JAX initialises its backend."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()


def _hlo_instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """Compiled HLO text -> {instruction: (opcode, op_name, body of the fused computation or '')}."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%(\S+) \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
    out = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%(\S+) = \S+? ([\w-]+)\((.*)$", hlo, re.M):
        name, opcode, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.-]+)", rest)
        out[name] = (opcode, op_name.group(1) if op_name else "", bodies.get(calls.group(1), "") if calls else "")
    return out


def _xla_category(opcode: str, op_name: str, body: str) -> str:
    code = opcode + "\n" + body
    if re.search(r"\b(dot|convolution)\(", code) or opcode in ("dot", "convolution"):
        return ATTENTION if "/attn/" in op_name and _ATTENTION_EINSUM.search(op_name) else LINEAR
    if "GrainModel" not in op_name and "jvp(" not in op_name and "transpose(" not in op_name:
        return OPTIMIZER  # optax's update: the step's own ops outside the model and the loss
    ops = set(re.findall(r"= \S+ ([\w-]+)\(", body)) - {"parameter", "bitcast", "reshape", "constant"}
    if opcode in ("copy", "transpose", "broadcast") or (opcode == "fusion" and ops <= {"copy", "transpose", "broadcast"}):
        return COPY
    if "token_embedding" in op_name or "scatter" in code:
        return EMBEDDING
    if _NORM.search(op_name):
        return NORM
    if "/attn/" in op_name:
        return ATTENTION
    if "/mlp/" in op_name:
        return ACTIVATION
    return OTHER


def profile_jax(run, hlo: str) -> dict[str, float]:
    """{category: ms} of one call of ``run`` (a compiled step whose optimised HLO text is ``hlo``)."""
    import jax
    instructions = _hlo_instructions(hlo)
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            run()
        (path,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for event in events:  # leaf thunk events are named after their HLO instruction
        if event.get("ph") == "X" and event["name"] in instructions:
            totals[_xla_category(*instructions[event["name"]])] += event.get("dur", 0) / 1e3
    if not totals:
        raise RuntimeError("the trace has no per-instruction events: was XLA_FLAGS set before JAX started "
                           "(step_profile.enable_xla_traceme)?")
    return dict(totals)


def _torch_category(op: str) -> str:
    if re.search(r"scaled_dot_product|flash_attention|softmax|bmm|baddbmm", op):
        return ATTENTION
    if re.search(r"aten::(mm|addmm|matmul|linear|convolution|_convolution|mkldnn_convolution|convolution_backward)$", op):
        return LINEAR
    if "layer_norm" in op:
        return NORM
    if re.search(r"sigmoid|gelu", op):
        return ACTIVATION
    if re.search(r"embedding|index_select|index_add|index_put", op):
        return EMBEDDING
    if "_foreach" in op or "lerp" in op or "addcdiv" in op or "addcmul" in op:
        return OPTIMIZER
    if re.search(r"aten::(copy_|clone|contiguous|_to_copy|cat|fill_|zero_|zeros|zeros_like|empty\w*|"
                 r"transpose|permute|t|view|reshape|_unsafe_view|expand|as_strided|select|slice|unbind|split)$", op):
        return COPY
    return OTHER


def profile_torch(run) -> dict[str, float]:
    """{category: ms} of one call of ``run`` (a PyTorch train step), from self CPU time per ATen op.

    Ops called inside ``Optimizer.step`` (torch's AdamW on CPU loops over parameters with plain
    ``mul_`` / ``sqrt`` / ``lerp_``...) count as the optimizer's, those inside ``zero_grad`` as fills.
    """
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    totals = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent, scope = event.cpu_parent, None
        while parent is not None and scope is None:
            scope = (OPTIMIZER if parent.name.startswith("Optimizer.step") else
                     COPY if parent.name.startswith("Optimizer.zero_grad") else None)
            parent = parent.cpu_parent
        totals[scope or _torch_category(event.name)] += event.self_cpu_time_total / 1e3
    return dict(totals)


def table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per category, ms and share per column."""
    lines = ["| category | " + " | ".join(f"{name} ms (share)" for name in columns) + " |",
             "|---|" + "---|" * len(columns)]
    sums = {name: sum(col.values()) or 1.0 for name, col in columns.items()}
    for category in CATEGORIES + ("total",):
        cells = []
        for name, col in columns.items():
            ms = sums[name] if category == "total" else col.get(category, 0.0)
            cells.append(f"{ms:.0f} ({100 * ms / sums[name]:.0f}%)")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
