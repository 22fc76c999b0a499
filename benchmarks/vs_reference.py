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
import tempfile
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
    """(a zero-argument callable running one compiled train step of our model, its optimised HLO); a GRAIN
    model also encodes the batch's descriptions and trains with its decoder's dropout, as the reference does."""
    overrides, buckets, compiler_options = model_step.split_overrides(overrides, jax.default_backend())
    model = create_model(model_name, **overrides)
    keys = text_keys(model)
    batch, packed = text_batching.fit_batch(batch, buckets, keys, model.description_budget)
    model = model if packed else model.every_description_slot()  # as the trainer runs a batch over the budget
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["images"], *(batch[k] for k in keys)))["params"]
    tx = optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1)
    state = [params, tx.init(params), jax.random.key(1)]
    config = LossConfig()

    # Donated like the trainer's step (trainer.compile_train_step): the update writes into the old
    # parameters' and moments' buffers, as PyTorch's in-place AdamW does, instead of fresh memory.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rng, batch):
        rng, dropout = jax.random.split(rng)

        def loss_fn(params):
            out, _ = model.apply({"params": params}, batch["images"], *(batch[k] for k in keys), train=True,
                                 rngs={"dropout": dropout})
            return total_loss(out, batch, config)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rng, loss

    batch = jax.device_put(batch)
    start = time.perf_counter()
    compiled = step.lower(*state, batch).compile(compiler_options)
    temp = compiled.memory_analysis().temp_size_in_bytes
    lengths = " / ".join(str(batch[k].shape[-1]) for k in keys)
    print(f"  ours {model_name} {overrides} {compiler_options}, texts of {lengths} tokens: "
          f"compiled in {time.perf_counter() - start:.1f} s, temporaries {temp / 2**20:.0f} MiB", flush=True)

    def run():
        *state[:], loss = compiled(*state, batch)  # params, moments, rng: the next step's inputs
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


FACTORIES = {"S/16": "CLIP_VITS16", "B/16": "CLIP_VITB16", "L/14": "CLIP_VITL14"}  # clip/custom_models.py


def _import_authors(repo: str, variant: str):
    """The user's checkout of the authors' code on ``sys.path`` (first, as their scripts expect to run from its root)."""
    if variant not in FACTORIES:
        raise ValueError(f"--variant {variant!r}: the authors' code builds only {sorted(FACTORIES)}")
    if not os.path.isfile(os.path.join(repo, "clip", "custom_models.py")):
        raise FileNotFoundError(f"--reference_repo {repo!r} has no clip/custom_models.py (a grain-clip checkout?)")
    sys.path.insert(0, os.path.abspath(repo))


def authors_model(repo: str, variant: str) -> torch.nn.Module:
    _import_authors(repo, variant)
    from clip import custom_models  # the user's checkout of the authors' code
    return getattr(custom_models, FACTORIES[variant])()


def _authors_encode(model, images, texts):
    out = model(images, texts, None, return_hidden_state=False)
    return out["image_embed"], out["text_embed"], out["logit_scale"]


def grain_batch(batch_size: int, image_size: int, caption_tokens: int, description_tokens: int,
                valid_descriptions: int, max_boxes: int = 5) -> dict:
    """A contract batch with exactly ``valid_descriptions`` boxed descriptions over the batch (spread evenly
    over the images, first slots first), texts zero padded to 77 tokens."""
    if not 0 < valid_descriptions <= batch_size * max_boxes:
        raise ValueError(f"--valid_descriptions must be in 1..{batch_size * max_boxes}, got {valid_descriptions}")
    batch = fake_batch(batch_size, image_size, caption_tokens, 8, max_boxes)
    counts = np.full(batch_size, valid_descriptions // batch_size) + (np.arange(batch_size) < valid_descriptions % batch_size)
    batch["box_mask"] = np.arange(max_boxes)[None] < counts[:, None]
    rng = np.random.default_rng(1)
    boxes = np.concatenate([rng.uniform(0.25, 0.75, (batch_size, max_boxes, 2)),
                            rng.uniform(0.05, 0.45, (batch_size, max_boxes, 2))], -1)
    batch["boxes"] = (boxes * batch["box_mask"][..., None]).astype(np.float32)
    descriptions = fake_batch(batch_size * max_boxes, 8, description_tokens, 8, seed=2)["caption_tokens"]
    batch["description_tokens"] = descriptions.reshape(batch_size, max_boxes, -1) * batch["box_mask"][..., None]
    for key in ("caption_tokens", "description_tokens"):
        pad = [(0, 0)] * (batch[key].ndim - 1) + [(0, CONTEXT - batch[key].shape[-1])]
        batch[key] = np.pad(batch[key], pad)
    return batch


def authors_grain_step(repo: str, variant: str, batch: dict, num_queries: int = 5):
    """One step of the authors' GRAIN training loop (train.py ``train_and_eval``), built as their ``main``
    builds it: backbone, ``ObjDecoder`` over ``Cross_Attention`` (dropout 0.1), Hungarian ``SetCriterion``,
    ``CLIPLoss`` + box loss + ``WordContrastiveLoss``, ``optim_policy`` + AdamW, logit-scale clamp; fp32 on CPU
    (their ``amp`` autocast and grad scaler are CUDA-only and off here), only the valid descriptions encoded.

    On a CPU-only torch their ``prepare_targets`` calls ``.cuda()``: here that returns the tensor unchanged.
    Their ``CLIPLoss`` all-gathers, so a one-process gloo group is started.
    """
    backbone = authors_model(repo, variant)
    from model import box_utils, losses, tfm  # their modules (model/, beside clip/)
    from utils.train_utils import optim_policy
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    if not torch.distributed.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="vs_reference_gloo_", delete=False).name
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    decoder = tfm.ObjDecoder(transformer=tfm.Cross_Attention(normalize_before=True, return_intermediate_dec=True,
                                                            dropout=0.1),
                             num_classes=22047, num_queries=num_queries + 1, aux_loss=True, pred_traj=True,
                             feature_dim=backbone.visual.embed_dim, self_attn=False)
    criterion = box_utils.SetCriterion(22047, matcher=box_utils.build_matcher(None),
                                       weight_dict={"loss_bbox_all_boxes": 1.0, "loss_giou_all_boxes": 1.0},
                                       eos_coef=0.1, losses=["boxes", "cardinality"])
    clip_loss, word_loss = losses.CLIPLoss(), losses.WordContrastiveLoss()
    optimizer = torch.optim.AdamW(optim_policy(backbone, decoder, 1e-4, 0.1), lr=1e-4, weight_decay=0.1,
                                  betas=(0.9, 0.98), eps=1e-8)

    images = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()
    captions = torch.from_numpy(batch["caption_tokens"]).long()
    avail = torch.from_numpy(batch["box_mask"]).long()  # [B, M]
    descriptions = torch.from_numpy(batch["description_tokens"]).long().flatten(0, 1)[avail.flatten() == 1]
    cx, cy, w, h = np.moveaxis(batch["boxes"], -1, 0)  # theirs: xyxy pixels of the squashed image
    size = batch["images"].shape[1]
    boxes = torch.from_numpy(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size
                             * batch["box_mask"][..., None]).float()
    backbone.train()
    decoder.train()

    def run():
        output = backbone(images, captions, descriptions, return_hidden_state=True, use_desc_train=True)
        model_out, image_embeds, region_embeds = decoder(output["image_embed"])
        loss = clip_loss(image_embeds, output["text_embed"], output["logit_scale"])["loss"]
        loss = loss + box_utils.compute_box_loss("all_boxes", criterion, model_out, boxes, None, None,
                                                 n_queries=num_queries)
        loss = loss + word_loss(model_out, output["desc_embed"], region_embeds, criterion, boxes,
                                num_queries, avail.flatten(), output["logit_scale"])["word_loss"]
        loss.backward()
        optimizer.step()
        backbone.zero_grad(set_to_none=True)
        decoder.zero_grad(set_to_none=True)
        backbone.logit_scale.data.clamp_(0, 4.6052)
    run()  # warm-up
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="clip", choices=("clip", "grain"),
                        help="clip: vs open_clip (and the authors' CLIP); grain: vs the authors' GRAIN step "
                             "(needs --reference_repo)")
    parser.add_argument("--variant", default="S/16", help="ViT variant, e.g. S/16, B/16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--caption_tokens", type=int, default=32, help="longest caption (SOT..EOT) in tokens")
    parser.add_argument("--description_tokens", type=int, default=16,
                        help="grain: longest region description (SOT..EOT) in tokens")
    parser.add_argument("--valid_descriptions", type=int, default=30,
                        help="grain: boxed descriptions in the batch, of batch_size x 5 slots (the issue's 30 of 40)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference_repo", default=None, help="a checkout of github.com/shaunak27/grain-clip")
    parser.add_argument("--overrides", default="",
                        help="also time ours with these model options (e.g. 'text_length_buckets=(16,32,48,64)', "
                             "which cuts our batch's texts on the host)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, profile one step of each and print time per op category")
    args = parser.parse_args()
    if args.model == "grain" and not args.reference_repo:
        parser.error("--model grain times the authors' GRAIN step: pass --reference_repo (a grain-clip checkout)")
    if args.profile:
        step_profile.enable_xla_traceme()  # before JAX starts its backend

    if args.model == "grain":
        batch = grain_batch(args.batch_size, args.image_size, args.caption_tokens, args.description_tokens,
                            args.valid_descriptions)
    else:
        batch = fake_batch(args.batch_size, args.image_size, args.caption_tokens, 8)
        batch["caption_tokens"] = np.pad(batch["caption_tokens"], ((0, 0), (0, CONTEXT - args.caption_tokens)))
    # Both models take normalised float pixels (the batch contract's uint8 is normalised inside our train step).
    batch["images"] = np.array(transforms.normalize(batch["images"], transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))
    common = dict(vit_variant=args.variant, image_size=args.image_size, dtype="float32")
    overrides = model_step.parse_overrides(args.overrides)
    torch.manual_seed(0)
    if args.model == "grain":
        name = "grain-vit-b16"  # with the variant's image tower; the reference's 5 region queries, dropout 0.1
        theirs = authors_grain_step(args.reference_repo, args.variant, batch)
        pairs = {"authors' GRAIN": (*jax_step(name, common, batch), theirs)}
        if args.overrides:  # ours computing less (same result), against the same PyTorch step
            pairs[f"authors' GRAIN, ours with {args.overrides}"] = (
                *jax_step(name, {**common, **overrides}, batch), theirs)
        what = f"GRAIN step ({args.valid_descriptions} of {args.batch_size * 5} descriptions valid)"
    else:
        name = "clip-vit-b16"  # with the variant's image tower
        open_clip = torch_step(open_clip_model(args.variant, args.image_size), _open_clip_encode, batch)
        pairs = {"open_clip": (*jax_step(name, {**common, **OPENAI_VIT}, batch), open_clip)}
        if args.overrides:  # ours computing less (same result), against the same PyTorch step
            pairs[f"open_clip, ours with {args.overrides}"] = (
                *jax_step(name, {**common, **OPENAI_VIT, **overrides}, batch), open_clip)
        if args.reference_repo:
            pairs["authors' CLIP"] = (*jax_step(name, common, batch),
                                      torch_step(authors_model(args.reference_repo, args.variant), _authors_encode,
                                                 batch))
        else:
            print("  (no --reference_repo: the authors' code is not timed)")
        what = "CLIP step"

    print(f"{args.variant} {what}, batch {args.batch_size} @ {args.image_size}px, fp32, {jax.device_count()} x "
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
