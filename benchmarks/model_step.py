"""Forward and train-step time of registered models on the default JAX backend.

    python benchmarks/model_step.py --models grain-tiny,clip-tiny --batch_size 32 --image_size 64 \
        --caption_length 24 --description_length 12 [--dtype bfloat16] [--remat_policy full]
    # side by side: model overrides per variant, timed round-robin, ratios to the first variant
    python benchmarks/model_step.py --models grain-vit-s16 --image_size 224 --batch_size 8 \
        --variants "attention_impl=explicit;attention_impl=xla"
    # compile time only (abstract params, nothing runs): unrolled vs scanned towers
    python benchmarks/model_step.py --models grain-vit-b16 --image_size 224 --batch_size 8 --compile_only \
        --variants "scan_layers=False;scan_layers=True"

A variant's ``text_length_buckets=(...)`` is not a model option: it cuts the batch's texts on the host
(``config.data.text_length_buckets``, ``text_batching.fit_texts``), as the trainer does. Its ``xla_*`` keys are
XLA compiler options over the trainer's (``trainer.compiler_options``), e.g. XLA's default CPU scheduler against
ours: ``--variants ";xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"``.

Prints, per model (and variant), its parameter count, the compile time of the train step and the median
wall (and process CPU) time of the jitted forward (train=False) and of a full train step (forward + backward
of ``total_loss`` + AdamW update) on a random batch that satisfies the batch contract. Variants are timed
interleaved (one call of each per round), so a load change on a shared machine hits them alike.
``--compile_only``: the train step's trace (jaxpr + StableHLO) and XLA compile times, from shapes only, one
variant after the other (nothing is cached between them: each variant is another program).
"""
from __future__ import annotations

import argparse
import ast
import functools
import re
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from grain_jax.batch import fake_batch
from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from grain_jax.data import transforms
from grain_jax.losses import LossConfig, total_loss
from grain_jax.inference.objective import text_keys
from grain_jax.models import create_model, init_params, param_counts, text_batching
from grain_jax.train import trainer


def _median_seconds(fn, *args, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per call; CPU time stays meaningful on a shared, loaded machine."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def parse_overrides(text: str) -> dict:
    """``"a=1,b=xla"`` -> ``{"a": 1, "b": "xla"}`` (ints, floats and tuples of ints parsed as such)."""
    overrides = {}
    for item in filter(None, re.split(r",(?![^()]*\))", text)):  # commas inside (...) belong to a tuple
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def split_overrides(overrides: dict, platform: str) -> tuple[dict, tuple[int, ...], dict]:
    """(model overrides, text_length_buckets, XLA compiler options) of a variant.

    The buckets are the batch's (cut on the host), not the model's. Keys starting with ``xla_`` are XLA
    options, applied over the ones the trainer compiles its step with on ``platform``
    (``trainer.compiler_options``), e.g. ``xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT``.
    """
    model = {k: v for k, v in overrides.items() if not k.startswith("xla_")}
    buckets = tuple(model.pop("text_length_buckets", ()))
    return model, buckets, {**trainer.compiler_options(platform),
                            **{k: v for k, v in overrides.items() if k.startswith("xla_")}}


def _label(name: str, overrides: dict, model) -> str:
    label = f"{name}[{','.join(f'{k}={v}' for k, v in overrides.items())}]" if overrides else name
    return label + f" ({sum(param_counts(model).values()) / 1e6:.2f} M params)"


def prepare(name: str, overrides: dict, args: argparse.Namespace):
    """(label, compile seconds, forward fn, train-step fn) of one model variant, compiled;
    with ``args.compile_only``: (label, trace seconds, compile seconds), nothing allocated or run."""
    model_overrides, buckets, compiler_options = split_overrides(overrides, jax.default_backend())
    model = create_model(name, image_size=args.image_size, dtype=args.dtype, remat_policy=args.remat_policy,
                         **model_overrides)
    batch = fake_batch(args.batch_size, args.image_size, args.caption_length, args.description_length)
    if args.pad_texts_to:  # short texts in long zero-padded rows, as real data tokenized to 77
        for key in ("caption_tokens", "description_tokens"):
            pad = [(0, 0)] * (batch[key].ndim - 1) + [(0, args.pad_texts_to - batch[key].shape[-1])]
            batch[key] = np.pad(batch[key], pad)
    batch, packed = text_batching.fit_batch(batch, buckets, text_keys(model), model.description_budget)
    model = model if packed else model.every_description_slot()  # as the trainer runs a batch over the budget
    batch["images"] = np.asarray(transforms.normalize(batch["images"], IMAGENET_MEAN, IMAGENET_STD))  # model input
    init = functools.partial(init_params, model)
    params = nn.unbox(jax.eval_shape(init, jax.random.key(0)) if args.compile_only
                      else jax.jit(init)(jax.random.key(0)))
    tx = optax.adamw(1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1)
    opt_state = (jax.eval_shape if args.compile_only else lambda f, x: f(x))(tx.init, params)
    config = LossConfig()

    def forward(params, batch):
        return model.apply({"params": params}, batch["images"], batch["caption_tokens"],
                           batch["description_tokens"])[0]

    def loss_fn(params, batch, key):
        out, _ = model.apply({"params": params}, batch["images"], batch["caption_tokens"],
                             batch["description_tokens"], train=True, rngs={"dropout": key})
        return total_loss(out, batch, config)[0]

    @jax.jit
    def train_step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(1)
    # (wall, process CPU) seconds: CPU time stays meaningful on a loaded machine
    start = np.array([time.perf_counter(), time.process_time()])
    lowered = train_step.lower(params, opt_state, batch, key)
    traced = np.array([time.perf_counter(), time.process_time()])
    compiled = lowered.compile(compiler_options)
    compiled_at = np.array([time.perf_counter(), time.process_time()])
    if args.compile_only:
        return _label(name, overrides, model), traced - start, compiled_at - traced
    compile_s = compiled_at[0] - start[0]
    jax.block_until_ready(compiled(params, opt_state, batch, key))
    forward = jax.jit(forward)
    jax.block_until_ready(forward(params, batch))
    return (_label(name, overrides, model), compile_s, functools.partial(forward, params, batch),
            functools.partial(compiled, params, opt_state, batch, key))


def compile_times(name: str, args: argparse.Namespace) -> None:
    base = None
    for variant in args.variants.split(";"):
        label, trace, compile_ = prepare(name, parse_overrides(variant), args)
        total = trace + compile_
        base = total if base is None else base
        print(f"{label}: batch {args.batch_size} @ {args.image_size}px, dtype {args.dtype}, remat "
              f"{args.remat_policy}: train step trace {trace[0]:.1f} s + XLA compile {compile_[0]:.1f} s = "
              f"{total[0]:.1f} s wall (CPU {trace[1]:.1f} + {compile_[1]:.1f} = {total[1]:.1f} s), / first variant: "
              f"wall {total[0] / base[0]:.3f}, CPU {total[1] / base[1]:.3f}", flush=True)


def benchmark(name: str, args: argparse.Namespace) -> None:
    variants = [prepare(name, parse_overrides(v), args) for v in args.variants.split(";")]
    times = {label: ([], []) for label, *_ in variants}
    for _ in range(args.repeats):  # round-robin
        for label, _, forward, step in variants:
            times[label][0].append(_median_seconds(forward, repeats=1))
            times[label][1].append(_median_seconds(step, repeats=1))
    base = None
    for label, compile_s, _, _ in variants:
        fwd, step = (np.median(np.array(t), axis=0) for t in times[label])
        base = step[0] if base is None else base
        print(f"{label}: batch {args.batch_size} @ {args.image_size}px, dtype {args.dtype}, "
              f"remat {args.remat_policy}: compile {compile_s:.1f} s, forward {fwd[0] * 1e3:.0f} ms "
              f"(CPU {fwd[1] * 1e3:.0f} ms), train step {step[0] * 1e3:.0f} ms (CPU {step[1] * 1e3:.0f} ms), "
              f"{args.batch_size / step[0]:.0f} img/s, step / first variant {step[0] / base:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="grain-tiny,clip-tiny")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--caption_length", type=int, default=24)
    parser.add_argument("--description_length", type=int, default=12)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat_policy", default="none")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pad_texts_to", type=int, default=0,
                        help="zero-pad the texts (at most caption/description_length long) to this length")
    parser.add_argument("--variants", default="", help="';'-separated model overrides 'key=value,...' per variant")
    parser.add_argument("--compile_only", action="store_true", help="time the train step's trace and compile only")
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for name in args.models.split(","):
        (compile_times if args.compile_only else benchmark)(name, args)


if __name__ == "__main__":
    main()
