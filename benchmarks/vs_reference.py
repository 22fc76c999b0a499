r"""Our train step side by side with PyTorch implementations of the same model: same shapes, same machine.

    python benchmarks/vs_reference.py --variant S/16 --batch_size 8                  # vs open_clip
    python benchmarks/vs_reference.py --variant S/16 --reference_repo PATH/grain-clip  # + the authors' CLIP
    python benchmarks/vs_reference.py --variant S/16 --overrides "text_length_buckets=(16,32,48,64)" --profile

One step = forward, contrastive loss, backward, AdamW, in float32 on the default devices (CPU: both
frameworks use every core). Steps alternate between the implementations (interleaved rounds), so a
load change on a shared machine hits both alike; the printed ratio is ours / theirs of the median
step (wall and process-CPU time), < 1 meaning ours is faster. Each side also shows its kernel (system) CPU
time and minor page faults per step: memory the step touches for the first time costs a fault per 4 KiB page.

* open_clip (installed, a test dependency): ``open_clip.model.CLIP`` with OpenAI's ViT and text
  tower at our variant's sizes, against our ``clip-vit-*`` with the matching OpenAI options.
* The authors' code (github.com/shaunak27/grain-clip) is not a package and is never vendored here:
  clone it yourself and pass ``--reference_repo``; its ``clip/custom_models.py`` CLIP (timm qk-norm
  ViT + OpenAI text tower, the GRAIN paper's CLIP baseline) is timed against our ``clip-vit-*``
  (same architecture). Their GRAIN step (decoder, matcher, losses in train.py) is not harnessed.

``--overrides``: ours is also timed with these model options (work that cannot change the result left out),
against the same PyTorch step; ``text_length_buckets=(...)`` cuts our batch's captions on the host to the
bucket that holds them (``config.data.text_length_buckets``), theirs stay at 77; ``xla_*=...`` are XLA compiler
options over the ones the trainer uses (``trainer.compiler_options``). ``--profile``: after the
timed rounds, one step of each is profiled and its time printed per op category (``step_profile.py``).

Texts are 77 tokens zero padded, with ``--caption_tokens`` real tokens at most (both sides see the
same ids).
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax
import torch

from grain_jax.batch import fake_batch
from grain_jax.data import transforms
from grain_jax.inference.objective import text_keys
from grain_jax.losses import LossConfig, total_loss
from grain_jax.models import OPENAI_VIT, create_model, text_batching
from grain_jax.models.vit import decode_variant

import model_step  # benchmarks/, beside this script
import step_profile

CONTEXT = 77


def _time(fn) -> tuple[float, float, float, int]:
    """(wall s, process CPU s, of which kernel s, minor page faults) of one call."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return wall, user + system, system, after.ru_minflt - before.ru_minflt


def jax_step(model_name: str, overrides: dict, batch: dict):
    """(a zero-argument callable running one compiled train step of our CLIP-mode model, its optimised HLO)."""
    overrides, buckets, compiler_options = model_step.split_overrides(overrides, jax.default_backend())
    model = create_model(model_name, **overrides)
    batch = text_batching.fit_texts(batch, buckets, text_keys(model))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["images"], batch["caption_tokens"]))["params"]
    tx = optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1)
    state = [params, tx.init(params)]
    config = LossConfig()

    # Donated like the trainer's step (trainer.compile_train_step): the update writes into the old
    # parameters' and moments' buffers, as PyTorch's in-place AdamW does, instead of fresh memory.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        def loss_fn(params):
            out, _ = model.apply({"params": params}, batch["images"], batch["caption_tokens"], train=True)
            return total_loss(out, batch, config)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = jax.device_put(batch)
    start = time.perf_counter()
    compiled = step.lower(state[0], state[1], batch).compile(compiler_options)
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"  ours {model_name} {overrides} {compiler_options}, texts of {batch['caption_tokens'].shape[-1]} tokens: "
          f"compiled in {time.perf_counter() - start:.1f} s, temporaries {temp / 2**20:.0f} MiB", flush=True)

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], batch)
        jax.block_until_ready(loss)
    run()  # warm-up
    return run, compiled.as_text()


def torch_step(model: torch.nn.Module, encode, batch: dict):
    """One PyTorch train step: ``encode(model, images, texts) -> (image_emb, text_emb, logit_scale)``."""
    images = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()
    texts = torch.from_numpy(batch["caption_tokens"]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    labels = torch.arange(images.shape[0])
    model.train()

    def run():
        image_emb, text_emb, scale = encode(model, images, texts)
        image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
        text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
        logits = scale * image_emb @ text_emb.T
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    run()  # warm-up
    return run


def open_clip_model(variant: str, image_size: int) -> torch.nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    vit = decode_variant(variant)
    vision = CLIPVisionCfg(layers=vit["depth"], width=vit["width"], head_width=vit["width"] // vit["num_heads"],
                           patch_size=vit["patch_size"], image_size=image_size)
    text = CLIPTextCfg(context_length=CONTEXT, vocab_size=49408, width=512, heads=8, layers=12)
    return CLIP(512, vision, text, quick_gelu=True)


def _open_clip_encode(model, images, texts):
    return model.encode_image(images), model.encode_text(texts), model.logit_scale.exp()


def authors_model(repo: str, variant: str) -> torch.nn.Module:
    factories = {"S/16": "CLIP_VITS16", "B/16": "CLIP_VITB16", "L/14": "CLIP_VITL14"}
    if variant not in factories:
        raise ValueError(f"--variant {variant!r}: the authors' code builds only {sorted(factories)}")
    if not os.path.isfile(os.path.join(repo, "clip", "custom_models.py")):
        raise FileNotFoundError(f"--reference_repo {repo!r} has no clip/custom_models.py (a grain-clip checkout?)")
    sys.path.insert(0, os.path.abspath(repo))
    from clip import custom_models  # the user's checkout of the authors' code
    return getattr(custom_models, factories[variant])()


def _authors_encode(model, images, texts):
    out = model(images, texts, None, return_hidden_state=False)
    return out["image_embed"], out["text_embed"], out["logit_scale"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="S/16", help="ViT variant, e.g. S/16, B/16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--caption_tokens", type=int, default=32, help="longest caption (SOT..EOT) in tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference_repo", default=None, help="a checkout of github.com/shaunak27/grain-clip")
    parser.add_argument("--overrides", default="",
                        help="also time ours with these model options (e.g. 'text_length_buckets=(16,32,48,64)', "
                             "which cuts our batch's texts on the host)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, profile one step of each and print time per op category")
    args = parser.parse_args()
    if args.profile:
        step_profile.enable_xla_traceme()  # before JAX starts its backend

    batch = fake_batch(args.batch_size, args.image_size, args.caption_tokens, 8)
    # Both models take normalised float pixels (the batch contract's uint8 is normalised inside our train step).
    batch["images"] = np.array(transforms.normalize(batch["images"], transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))
    batch["caption_tokens"] = np.pad(batch["caption_tokens"], ((0, 0), (0, CONTEXT - args.caption_tokens)))
    name = "clip-vit-b16"  # with the variant's image tower
    common = dict(vit_variant=args.variant, image_size=args.image_size, dtype="float32")
    torch.manual_seed(0)
    open_clip = torch_step(open_clip_model(args.variant, args.image_size), _open_clip_encode, batch)
    pairs = {"open_clip": (*jax_step(name, {**common, **OPENAI_VIT}, batch), open_clip)}
    if args.overrides:  # ours computing less (same result), against the same PyTorch step
        pairs[f"open_clip, ours with {args.overrides}"] = (
            *jax_step(name, {**common, **OPENAI_VIT, **model_step.parse_overrides(args.overrides)}, batch), open_clip)
    if args.reference_repo:
        pairs["authors' CLIP"] = (*jax_step(name, common, batch),
                                  torch_step(authors_model(args.reference_repo, args.variant), _authors_encode, batch))
    else:
        print("  (no --reference_repo: the authors' code is not timed)")

    print(f"{args.variant} CLIP step, batch {args.batch_size} @ {args.image_size}px, fp32, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    for label, (ours, hlo, theirs) in pairs.items():
        # [round, impl, (wall, cpu, system cpu, page faults)]
        times = np.array([[_time(ours), _time(theirs)] for _ in range(args.rounds)])
        med = np.median(times, axis=0)
        ratio = np.median(times[:, 0, :2] / times[:, 1, :2], axis=0)
        side = [f"{med[i, 0]:.2f} s (CPU {med[i, 1]:.2f} s, kernel {med[i, 2]:.2f} s, {med[i, 3] / 1e3:.0f}k page faults)"
                for i in range(2)]
        print(f"vs {label}: ours {side[0]}, theirs {side[1]}; ours/theirs wall {ratio[0]:.2f}, CPU {ratio[1]:.2f}",
              flush=True)
        if args.profile:
            print("one step of each, by category (summed over threads):\n"
                  + step_profile.table({"ours": step_profile.profile_jax(ours, hlo),
                                        label: step_profile.profile_torch(theirs)}), flush=True)


if __name__ == "__main__":
    main()
