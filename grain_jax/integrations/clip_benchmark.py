"""CLIP_benchmark plug-in: evaluate grain_jax checkpoints with ``clip_benchmark eval``.

CLIP_benchmark loads a model through a function returning ``(model, transform,
tokenizer)``; the model needs ``encode_image`` / ``encode_text`` returning torch tensors.
``load_grain_jax`` provides that on top of our JAX model, and ``register()`` makes it
CLIP_benchmark's model type ``grain_jax``; the console script ``grain-jax-clip-benchmark``
(``grain_jax.cli.clip_benchmark``) registers it and hands the command line to CLIP_benchmark's CLI:

    grain-jax-clip-benchmark eval --pretrained CHECKPOINT_DIR --model grain \\
        --dataset wds/mydata --dataset_root /data/mydata --task zeroshot_classification

``--pretrained`` is a grain_jax checkpoint directory (training or converter output) or
``random:<model name>``; ``--model`` is only a label in CLIP_benchmark's output names.
``--model_type grain_jax`` is added unless given. Needs ``pip install clip_benchmark``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from grain_jax import inference
from grain_jax.data import tokenizer as tokenizer_lib

MODEL_TYPE = "grain_jax"


class JaxClipModel(torch.nn.Module):
    """Torch-facing wrapper: embeddings are computed by the JAX model, returned as
    float32 torch tensors on the input's device (L2-normalised; CLIP_benchmark
    normalises again, harmlessly).

    For GRAIN checkpoints the image embedding is the decoder's global query, as in the
    reference's zero-shot evaluation; for CLIP checkpoints it is the projected CLS token.
    """

    def __init__(self, model: inference.InferenceModel):
        super().__init__()
        self.inference_model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] uint8 from ``transform`` (normalised on device, like training),
        or float already normalised -> [B, D]."""
        pixels = images.detach().cpu().permute(0, 2, 3, 1).numpy()
        pixels = pixels if pixels.dtype == np.uint8 else pixels.astype(np.float32)
        embeddings = np.ascontiguousarray(self.inference_model.encode_images(pixels))
        # On the input's device: CLIP_benchmark keeps its classifier there (cuda when available).
        return torch.from_numpy(embeddings).to(images.device)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [N, L] int (from ``tokenizer``) -> [N, D]."""
        embeddings = self.inference_model.encode_tokens(token_ids.detach().cpu().numpy())
        return torch.from_numpy(embeddings).to(token_ids.device)


class Tokenizer:
    """CLIP BPE like training (grain_jax.data.tokenizer), as a torch LongTensor [N, L]."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.from_numpy(tokenizer_lib.tokenize(texts, context_length=self.context_length).astype(np.int64))


class Transform:
    """PIL image -> uint8 tensor [3, S, S], squash-resized by ``grain_jax.inference.preprocess_image``
    like training; ``JaxClipModel.encode_image`` normalises it on device like the train step."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = inference.preprocess_image(np.asarray(image.convert("RGB")), self.spec)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_grain_jax(model_name: str = "", pretrained: str = "", cache_dir: str | None = None,
                   device: str | torch.device = "cpu"):
    """CLIP_benchmark's loader contract -> (model, transform, tokenizer).

    Args:
      model_name: a label only (CLIP_benchmark puts it in output file names).
      pretrained: a grain_jax checkpoint directory or ``random:<model name>``.
      cache_dir, device: unused; JAX places the computation itself.
    """
    del model_name, cache_dir, device
    if not pretrained:
        raise ValueError("--pretrained must be a grain_jax checkpoint directory or random:<model name>")
    model = inference.load(pretrained)
    return JaxClipModel(model), Transform(model.spec), Tokenizer(model.spec.caption_length)


def _topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's ``accuracy`` (fraction of rows whose target is among the top-k logits)
    without its ``float(1-element array)``, which NumPy >= 2.3 rejects."""
    ranked = logits.topk(max(topk), dim=1).indices  # [N, K]
    hits = ranked.eq(target.view(-1, 1))
    return [hits[:, :k].any(dim=1).float().mean().item() for k in topk]


def register() -> None:
    """Makes ``--model_type grain_jax`` known to CLIP_benchmark (and patches its top-k
    accuracy for NumPy 2, see ``_topk_accuracy``)."""
    from clip_benchmark import models
    from clip_benchmark.metrics import zeroshot_classification
    models.TYPE2FUNC[MODEL_TYPE] = load_grain_jax
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the same list object the CLI's --model_type choices use
    zeroshot_classification.accuracy = _topk_accuracy
