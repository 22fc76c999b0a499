"""Boxes for region descriptions with OWLv2: the authors' box_supervision.py protocol, in JAX (or PyTorch).

Per image:
1. squash the image to 224x224 (PIL bicubic, RGB) and scale to [0, 1];
2. resize bilinearly to the detector's input size (960 for OWLv2 B/16) and normalise with CLIP's mean/std
   (transformers' Owlv2ImageProcessor with do_pad=False, do_rescale=False);
3. queries = the first 10 descriptions with leading ". , ! ? - * space" stripped, padded with the string
   "<pad>" to 10, tokenised to the text tower's 16 tokens (longer ones are cut, EOT kept; reported);
4. per patch, the best query's sigmoid score; boxes scoring > 0.3 whose best query is not a "<pad>" are kept,
   as xyxy on the 960-px canvas of the squashed image: ``{"description", "bbox", "score"}``.

The "<pad>" strings are real queries (their first token is SOT), so, exactly as in the reference, a padding
query can win a patch and hide a real description's box there.

``JaxDetector`` runs batches jitted and data-parallel over the local devices (batch placed with
``sharding.batch_sharding``, parameters replicated); a multi-host job gives each process its own images.
``TorchDetector`` runs transformers' ``Owlv2ForObjectDetection`` with the same inputs and post-processing.
"""
from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from grain_jax.data import tokenizer

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
STRIP_CHARS = ".,!? -*"
PAD_QUERY = "<pad>"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The knobs of the authors' protocol (their values are the defaults)."""
    squash_size: int = 224
    num_queries: int = 10
    threshold: float = 0.3
    box_canvas: float = 960.0


def squash(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3] (RGB, bicubic, aspect ratio not kept). Raises OSError/ValueError
    for unreadable data."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.uint8)


def make_queries(descriptions: Sequence[str], num_queries: int) -> list[str]:
    """The first ``num_queries`` descriptions, leading punctuation stripped, padded with "<pad>"."""
    queries = [d.lstrip(STRIP_CHARS) for d in descriptions[:num_queries]]
    return queries + [PAD_QUERY] * (num_queries - len(queries))


def tokenize_queries(queries: Sequence[str], length: int) -> tuple[np.ndarray, list[int]]:
    """-> (tokens [Q, length] int32, indices of the queries that were cut to fit)."""
    full = tokenizer.tokenize(list(queries), context_length=77)
    cut = [i for i, row in enumerate(full) if np.count_nonzero(row) > length]
    return tokenizer.truncate(full, length).astype(np.int32), cut


def detections(scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, queries: Sequence[str],
               threshold: float) -> list[dict]:
    """One image's per-patch best scores [P], labels [P] and xyxy boxes [P, 4] -> the reference's records."""
    return [{"description": queries[int(q)], "bbox": [float(v) for v in box], "score": float(s)}
            for s, q, box in zip(scores, labels, boxes) if s > threshold and queries[int(q)] != PAD_QUERY]


def _postprocess(xp, logits, boxes, canvas):
    """logits [B, P, Q], cxcywh boxes [B, P, 4] -> (best score [B, P], best query [B, P], xyxy * canvas)."""
    best, label = logits.max(-1), logits.argmax(-1)
    centre, size = boxes[..., :2], boxes[..., 2:]
    xyxy = xp.concatenate([centre - 0.5 * size, centre + 0.5 * size], -1) * canvas
    return 1 / (1 + xp.exp(-best)), label, xyxy


class JaxDetector:
    """The Flax OWLv2 with the protocol's pre- and post-processing, jitted and sharded over ``mesh``.

    Args:
      config, params: from ``grain_jax.convert.owlv2.load_transformers_dir`` (or random ones in tests).
      protocol: see ``Protocol``.
      mesh: a ("data", "fsdp", "tensor") mesh; default: all local devices on "data".
      batch_size: images per jitted call, rounded up to the number of batch shards.
      dtype: compute dtype (float32 for the reference's numbers, bfloat16 for speed).
    """

    def __init__(self, config, params, protocol: Protocol = Protocol(), *, mesh=None, batch_size: int = 8,
                 dtype=None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        from grain_jax import sharding
        from grain_jax.inference.batching import round_up
        from grain_jax.models.owlv2 import OwlV2

        self.config, self.protocol, self.text_length = config, protocol, config.text_length
        self.mesh = mesh if mesh is not None else sharding.create_mesh((-1, 1, 1), devices=jax.local_devices())
        self.batch_size = round_up(batch_size, sharding.batch_shards(self.mesh.shape))
        self._batch_sharding = sharding.batch_sharding(self.mesh)
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        model = OwlV2(config, dtype=dtype or jnp.float32)
        size, canvas = config.image_size, protocol.box_canvas

        def detect(params, images, tokens):
            pixels = jax.image.resize(images.astype(jnp.float32) / 255, (images.shape[0], size, size, 3), "bilinear")
            pixels = (pixels - CLIP_MEAN) / CLIP_STD
            out = model.apply({"params": params}, pixels, tokens)
            return _postprocess(jnp, out["logits"], out["boxes"], canvas)

        self._detect = jax.jit(detect, out_shardings=self._batch_sharding)

    def raw(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [N, s, s, 3] squashed images, tokens [N, Q, L] -> per-patch (scores [N, P], labels [N, P],
        xyxy boxes [N, P, 4]) as numpy, in fixed-size sharded batches."""
        import jax

        from grain_jax.inference.batching import fixed_size_batches

        parts = []
        for (image_chunk, n), (token_chunk, _) in zip(fixed_size_batches(images, self.batch_size),
                                                      fixed_size_batches(tokens, self.batch_size)):
            placed = [jax.device_put(a, self._batch_sharding) for a in (image_chunk, token_chunk)]
            with jax.set_mesh(self.mesh):
                out = self._detect(self.params, *placed)
            parts.append([np.asarray(x)[:n] for x in out])
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


class TorchDetector:
    """transformers' ``Owlv2ForObjectDetection`` (PyTorch) with the same inputs and outputs as JaxDetector."""

    def __init__(self, model_dir: str, protocol: Protocol = Protocol(), *, batch_size: int = 8, device=None):
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessor

        self.protocol, self.batch_size, self.torch = protocol, batch_size, torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = Owlv2ForObjectDetection.from_pretrained(model_dir).to(self.device).eval()
        size = self.model.config.vision_config.image_size
        self.text_length = self.model.config.text_config.max_position_embeddings
        self.processor = Owlv2ImageProcessor(do_pad=False, do_rescale=False, size={"height": size, "width": size})

    def raw(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        torch, parts = self.torch, []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(images[start:start + self.batch_size]).permute(0, 3, 1, 2).float() / 255
            ids = torch.from_numpy(tokens[start:start + self.batch_size].astype(np.int64))
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.no_grad():
                out = self.model(input_ids=ids.reshape(-1, ids.shape[-1]).to(self.device), pixel_values=pixels,
                                 attention_mask=(ids.reshape(-1, ids.shape[-1]) > 0).long().to(self.device))
            result = _postprocess(np, out.logits.float().cpu().numpy(), out.pred_boxes.float().cpu().numpy(),
                                  self.protocol.box_canvas)
            parts.append(result)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def load_detector(model_dir: str, backend: str, protocol: Protocol, batch_size: int, dtype: str = "float32"):
    """``backend`` "jax" (Flax port, converted on load) or "torch" (transformers)."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"detector {model_dir!r} is not a directory (a transformers OWLv2 model folder, e.g. "
                                "`huggingface-cli download google/owlv2-base-patch16-ensemble --local-dir DIR`)")
    if backend == "torch":
        return TorchDetector(model_dir, protocol, batch_size=batch_size)
    if backend != "jax":
        raise ValueError(f"detector backend must be 'jax' or 'torch', got {backend!r}")
    import jax.numpy as jnp

    from grain_jax.convert.owlv2 import load_transformers_dir

    config, params = load_transformers_dir(model_dir)
    return JaxDetector(config, params, protocol, batch_size=batch_size, dtype=jnp.dtype(dtype))
