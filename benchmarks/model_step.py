"""Forward and train-step time of registered models on the default JAX backend.

    python benchmarks/model_step.py --models grain-tiny,clip-tiny --batch_size 32 --image_size 64 \
        --caption_length 24 --description_length 12 [--dtype bfloat16] [--remat_policy full]

Prints, per model, its parameter count, the compile time of the train step and the median wall
(and process CPU) time of the jitted forward (train=False) and of a full train step (forward + backward of
``total_loss`` + AdamW update) on a random batch that satisfies the batch contract.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from grain_jax.batch import fake_batch
from grain_jax.losses import LossConfig, total_loss
from grain_jax.models import create_model, param_counts


def _median_seconds(fn, *args, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per call; CPU time stays meaningful on a shared, loaded machine."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def benchmark(name: str, args: argparse.Namespace) -> None:
    model = create_model(name, image_size=args.image_size, dtype=args.dtype, remat_policy=args.remat_policy)
    batch = fake_batch(args.batch_size, args.image_size, args.caption_length, args.description_length)
    params = nn.unbox(jax.jit(lambda key: model.init({"params": key}, batch["images"], batch["caption_tokens"],
                                                     batch["description_tokens"]))(jax.random.key(0)))["params"]
    tx = optax.adamw(1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1)
    opt_state = tx.init(params)
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
    start = time.perf_counter()
    jax.block_until_ready(train_step(params, opt_state, batch, key))
    compile_s = time.perf_counter() - start
    forward = jax.jit(forward)
    jax.block_until_ready(forward(params, batch))
    fwd = _median_seconds(forward, params, batch, repeats=args.repeats)
    step = _median_seconds(train_step, params, opt_state, batch, key, repeats=args.repeats)
    total = sum(param_counts(model).values())
    print(f"{name}: {total / 1e6:.2f} M params, batch {args.batch_size} @ {args.image_size}px, dtype {args.dtype}, "
          f"remat {args.remat_policy}: compile {compile_s:.1f} s, forward {fwd[0] * 1e3:.0f} ms "
          f"(CPU {fwd[1] * 1e3:.0f} ms), train step {step[0] * 1e3:.0f} ms (CPU {step[1] * 1e3:.0f} ms), "
          f"{args.batch_size / step[0]:.0f} img/s", flush=True)


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
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for name in args.models.split(","):
        benchmark(name, args)


if __name__ == "__main__":
    main()
