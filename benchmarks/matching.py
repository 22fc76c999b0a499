"""Cost of on-device Hungarian matching and of the whole loss per step vs batch size.

    python benchmarks/matching.py --batch_sizes 32,128,512 --queries 5 --max_boxes 5 [--negative_groups 16]

Prints, per global batch size, the median wall time of the jitted matching
(``match_boxes``: cost matrix + vmapped ``optax.assignment.hungarian_algorithm``)
and of the jitted ``total_loss`` (forward only, and forward + backward), on the
default JAX backend. Inputs are random model outputs; the model is not run.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.batch import fake_batch
from grain_jax.losses import LossConfig, match_boxes, total_loss


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _random_outputs(rng, batch_size, queries, max_boxes, dim, layers):
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (layers, batch_size, queries, 2)),
                            rng.uniform(0.05, 0.5, (layers, batch_size, queries, 2))], -1).astype(np.float32)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "img/embedding": normal(batch_size, dim), "txt/caption": normal(batch_size, dim),
        "txt/descriptions": normal(batch_size, max_boxes, dim),
        "dec/region_embeddings": normal(batch_size, queries, dim),
        "dec/boxes": jnp.asarray(boxes[-1]), "dec/layer_boxes": jnp.asarray(boxes),
        "logit_scale": jnp.float32(np.log(1 / 0.07)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", default="32,128,512")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--max_boxes", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--negative_groups", type=int, default=1,
                        help=">1: per-device description negatives over this many sub-batches")
    args = parser.parse_args()

    config = LossConfig(description_negatives="per_device" if args.negative_groups > 1 else "global",
                        negative_groups=args.negative_groups)
    matcher = jax.jit(match_boxes)
    loss_fn = jax.jit(lambda o, b: total_loss(o, b, config)[0])
    grad_fn = jax.jit(jax.grad(lambda o, b: total_loss(o, b, config)[0]))
    print(f"backend={jax.default_backend()} devices={jax.device_count()} Q={args.queries} M={args.max_boxes} "
          f"D={args.dim} description_negatives={config.description_negatives} groups={config.negative_groups}")
    print(f"{'batch':>6} {'match ms':>9} {'us/image':>9} {'loss ms':>8} {'loss+grad ms':>13}")
    rng = np.random.default_rng(0)
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        batch = fake_batch(batch_size, image_size=8, max_boxes=args.max_boxes)
        batch = {k: jnp.asarray(batch[k]) for k in ("boxes", "box_mask")}
        outputs = _random_outputs(rng, batch_size, args.queries, args.max_boxes, args.dim, args.layers)
        match_s = _median_seconds(matcher, outputs["dec/boxes"], batch["boxes"], batch["box_mask"],
                                  repeats=args.repeats)
        loss_s = _median_seconds(loss_fn, outputs, batch, repeats=args.repeats)
        grad_s = _median_seconds(grad_fn, outputs, batch, repeats=args.repeats)
        print(f"{batch_size:>6} {match_s * 1e3:>9.2f} {match_s / batch_size * 1e6:>9.1f} {loss_s * 1e3:>8.2f} "
              f"{grad_s * 1e3:>13.2f}")


if __name__ == "__main__":
    main()
