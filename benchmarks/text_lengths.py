r"""How much text-tower work a batch really needs: valid descriptions per batch and tokens up to EOT.

    python benchmarks/text_lengths.py --num_scenes 1024 --batch_size 32

Measured on the embedded synthetic benchmark's train split (what the demo trains on). Prints the
distribution of valid descriptions per batch (the packing budget of ``model.description_budget`` must
cover it, else the batch is encoded in full and counted in ``txt/description_overflow``) and of the
longest EOT position per batch (what ``config.data.text_length_buckets`` should fit).
"""
import argparse

import numpy as np

from grain_jax.data import synthetic, tokenizer


def _percentiles(name: str, values: np.ndarray, of: int | None = None) -> None:
    qs = np.percentile(values, [0, 50, 90, 99, 100])
    share = f" (of {of}: {', '.join(f'{q / of:.2f}' for q in qs)})" if of else ""
    print(f"{name}: min/p50/p90/p99/max = {' / '.join(f'{q:.0f}' for q in qs)}{share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_scenes", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_boxes", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=32, help="image size (irrelevant to the texts)")
    args = parser.parse_args()
    scenes = synthetic.generate_scenes("train", 0, args.num_scenes, resolution=args.resolution,
                                       max_regions=args.max_boxes)
    num_batches = len(scenes) // args.batch_size
    valid = np.array([len(s.regions) for s in scenes[:num_batches * args.batch_size]])
    per_batch = valid.reshape(num_batches, args.batch_size).sum(1)
    print(f"{len(scenes)} synthetic train scenes, batches of {args.batch_size}, {args.max_boxes} slots each")
    _percentiles("valid descriptions per image", valid)
    _percentiles("valid descriptions per batch", per_batch, of=args.batch_size * args.max_boxes)
    texts = {"caption": [s.caption for s in scenes], "mllm_caption": [s.mllm_caption for s in scenes],
             "description": [r["description"] for s in scenes for r in s.regions]}
    for name, items in texts.items():
        eot = np.argmax(tokenizer.tokenize(items), axis=-1) + 1  # positions up to and including EOT
        _percentiles(f"{name} tokens up to EOT", eot)


if __name__ == "__main__":
    main()
