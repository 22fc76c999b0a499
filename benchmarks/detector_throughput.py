"""Images/s of the JAX OWLv2 detector (grain-jax-annotate's detect stage), random weights.

    python benchmarks/detector_throughput.py --shape tiny --batch 8 --steps 5
    python benchmarks/detector_throughput.py --shape b16 --batch 1 --steps 2   # OWLv2 B/16 at 960 px
    python benchmarks/detector_throughput.py --shape b16 --image_size 480 --batch 1 --steps 2

Times ``JaxDetector.raw`` (resize 224 -> input size, the network, per-patch best query, on every local
device) after one warm-up call that compiles; 10 queries of 16 tokens per image.
"""
import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.annotate import detect
from grain_jax.models.owlv2 import OwlV2, OwlV2Config

SHAPES = {
    "tiny": OwlV2Config(image_size=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=4,
                        vision_mlp_dim=64, text_width=32, text_depth=2, text_heads=4, text_mlp_dim=128,
                        embed_dim=32),
    "b16": OwlV2Config(),  # google/owlv2-base-patch16-ensemble: ViT-B/16 at 960 px, CLIP text tower
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image_size", type=int, default=0, help="override the input size (0: the shape's)")
    args = parser.parse_args()
    config = SHAPES[args.shape]
    if args.image_size:
        config = dataclasses.replace(config, image_size=args.image_size)
    # Random weights of the right shapes; init itself would run (and compile) a full forward pass.
    shapes = jax.eval_shape(OwlV2(config).init, jax.random.key(0),
                            jnp.zeros((1, config.image_size, config.image_size, 3)),
                            jnp.zeros((1, 1, config.text_length), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(np.float32), nn.unbox(shapes))
    detector = detect.JaxDetector(config, params, batch_size=args.batch, dtype=jnp.dtype(args.dtype))
    images = rng.integers(0, 256, (detector.batch_size, 224, 224, 3), dtype=np.uint8)
    queries = detect.make_queries(["a red wing", "the beak", "a long tail"], 10)
    tokens = np.stack([detect.tokenize_queries(queries, config.text_length)[0]] * detector.batch_size)
    start = time.perf_counter()
    detector.raw(images, tokens)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        detector.raw(images, tokens)
    seconds = (time.perf_counter() - start) / args.steps
    print(f"shape={args.shape} image_size={config.image_size} devices={len(jax.local_devices())} ({jax.local_devices()[0].platform}) "
          f"batch={detector.batch_size} dtype={args.dtype}: first call {compile_s:.1f} s, "
          f"{seconds:.3f} s/batch, {detector.batch_size / seconds:.2f} images/s")


if __name__ == "__main__":
    main()
