"""Box losses over matched pairs and the total GRAIN training loss.

    L = image_caption * L_ic
        + box_factor * (box_l1 * L_l1 + box_giou * L_giou)      [+ the same per aux layer]
        + region_description * L_rd

The paper writes L = L_ic + L_box + L_rd; the reference code divides the summed
box losses by len(weight_dict) / 3 = 2/3, i.e. scales them by 1.5, which is
``box_factor=1.5`` here (default 1, the paper's formula).

Matching (``matching.py``) uses the last decoder layer and is shared by the box
and region-description losses, as in the reference. Box losses are normalised
by the number of valid boxes in the *global* batch, clamped to >= 1 (the
reference uses the per-device count without a clamp, which is NaN on a device
with no boxes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from grain_jax.losses import blockwise, chunked, contrastive, matching, ring
from grain_jax.losses import boxes as box_lib

NEGATIVE_MODES = ("global", "per_device")
CONTRASTIVE_IMPLS = ("dense", "chunked", "ring")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights and matching settings (``LossConfig(**config.loss)``); hashable, so jit can treat it as static.

    Attributes:
      image_caption: weight of the image-caption contrastive loss L_ic.
      box_l1, box_giou: weights of the L1 and GIoU box losses inside the box term.
      box_factor: multiplier of the whole box term (reference code: 1.5, paper: 1).
      region_description: weight of the region-description loss L_rd.
      global_description: weight of a loss that is not the reference's (default 0): each region
        description is contrasted against the batch's global image embeddings, so that the global query
        learns what the descriptions ground (``contrastive.global_description_loss``; "dense" only).
      match_l1, match_giou: matching cost weights (reference: 5 and 2).
      match_similarity: weight of an optional -cos(region, description) matching
        cost (last layer only); 0 = the reference's box-only cost.
      aux_loss: add box losses of every intermediate decoder layer, each layer
        re-matched (the reference computes but never adds them).
      description_negatives: "global" = every description of the global batch is
        a negative for L_rd; "per_device" = only those of the region's own
        sub-batch (reference behaviour), with ``negative_groups`` sub-batches.
      negative_groups: number of equal sub-batches for "per_device" (set it to
        the number of data-parallel devices to mimic the reference).
      contrastive_impl: how L_ic and L_rd are computed, all with the same values and
        gradients: "dense" (the whole logits matrix, contrastive.py), "chunked"
        (``contrastive_chunks`` blocks of rows, rematerialised; chunked.py) or "ring"
        (shard_map + ppermute over the mesh's batch axes; ring.py).
      contrastive_chunks: number of row blocks of "chunked"; must divide the batch size.
    """
    image_caption: float = 1.0
    box_l1: float = 1.0
    box_giou: float = 1.0
    box_factor: float = 1.0
    region_description: float = 1.0
    global_description: float = 0.0
    match_l1: float = 5.0
    match_giou: float = 2.0
    match_similarity: float = 0.0
    aux_loss: bool = False
    description_negatives: str = "global"
    negative_groups: int = 1
    contrastive_impl: str = "dense"
    contrastive_chunks: int = 8

    def __post_init__(self):
        if self.description_negatives not in NEGATIVE_MODES:
            raise ValueError(f"loss.description_negatives must be one of {NEGATIVE_MODES}, "
                             f"got {self.description_negatives!r}")
        if int(self.negative_groups) < 1:
            raise ValueError(f"loss.negative_groups must be >= 1, got {self.negative_groups}")
        if self.contrastive_impl not in CONTRASTIVE_IMPLS:
            raise ValueError(f"loss.contrastive_impl must be one of {CONTRASTIVE_IMPLS}, "
                             f"got {self.contrastive_impl!r}")
        if self.global_description and self.contrastive_impl != "dense":
            raise ValueError(f"loss.global_description is computed with contrastive_impl='dense' only, "
                             f"got {self.contrastive_impl!r}")
        if int(self.contrastive_chunks) < 1:
            raise ValueError(f"loss.contrastive_chunks must be >= 1, got {self.contrastive_chunks}")

    @property
    def uses_boxes(self) -> bool:
        """Whether the box term contributes to the loss."""
        return bool(self.box_factor) and bool(self.box_l1 or self.box_giou)


def _row_statistics(config: LossConfig, num_groups: int) -> blockwise.RowStatistics:
    """The memory-bounded ``RowStatistics`` the config names (not for "dense")."""
    if config.contrastive_impl == "chunked":
        return functools.partial(chunked.row_statistics, num_chunks=config.contrastive_chunks)
    return functools.partial(ring.row_statistics, num_groups=num_groups)


def image_caption_loss(config: LossConfig, image_embeddings: jax.Array, caption_embeddings: jax.Array,
                       scale: jax.Array, example_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """L_ic with the config's ``contrastive_impl`` (see ``contrastive.image_caption_loss``)."""
    if config.contrastive_impl == "dense":
        return contrastive.image_caption_loss(image_embeddings, caption_embeddings, scale, example_mask)
    return blockwise.image_caption_loss(image_embeddings, caption_embeddings, scale, example_mask,
                                        _row_statistics(config, 1))


def region_description_loss(config: LossConfig, *args, negative_groups: int) -> tuple[jax.Array, jax.Array]:
    """L_rd with the config's ``contrastive_impl`` (arguments of ``contrastive.region_description_loss``)."""
    if config.contrastive_impl == "dense":
        return contrastive.region_description_loss(*args, negative_groups=negative_groups)
    return blockwise.region_description_loss(*args, _row_statistics(config, negative_groups),
                                             negative_groups=negative_groups)


def box_losses(pred_boxes: jax.Array, target_boxes: jax.Array, matches: matching.Matches,
               num_boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """L1 and GIoU losses summed over valid matched pairs, divided by ``num_boxes``.

    Args:
      pred_boxes: [B, Q, 4] cxcywh.
      target_boxes: [B, M, 4] cxcywh.
      matches: pairs from ``matching.match_boxes`` ([B, K] fields).
      num_boxes: [] normaliser (already clamped).

    Returns:
      (L_l1, L_giou) scalars: sum |b - b_hat| over 4 coords, and sum (1 - GIoU).
    """
    pred = matching.gather_matched(jnp.asarray(pred_boxes, jnp.float32), matches.query_index)
    target = matching.gather_matched(jnp.asarray(target_boxes, jnp.float32), matches.target_index)
    valid = matches.valid
    l1 = jnp.sum(jnp.where(valid[..., None], jnp.abs(pred - target), 0.0))
    giou = box_lib.generalized_iou(box_lib.cxcywh_to_xyxy(pred), box_lib.cxcywh_to_xyxy(target))
    giou_loss = jnp.sum(jnp.where(valid, 1.0 - giou, 0.0))
    return l1 / num_boxes, giou_loss / num_boxes


def _get(mapping: Mapping[str, jax.Array], key: str, what: str) -> jax.Array:
    if key not in mapping:
        raise KeyError(f"total_loss: {what} has no {key!r}; has {sorted(mapping)}")
    return mapping[key]


def total_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
               config: LossConfig = LossConfig()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss and its metrics from model outputs and a batch.

    Args:
      outputs: model outputs (docs/interfaces.md section 4): ``img/embedding``
        [B, D], ``txt/caption`` [B, D], ``logit_scale`` [] (raw log value), and for
        GRAIN ``dec/boxes`` [B, Q, 4], ``dec/region_embeddings`` [B, Q, D],
        ``dec/layer_boxes`` [L, B, Q, 4] (aux losses only), ``txt/descriptions``
        [B, M, D] (L_rd only). Terms whose inputs are absent are skipped, so CLIP
        outputs give only L_ic.
      batch: the batch contract (grain_jax/batch.py); uses ``boxes`` [B, M, 4],
        ``box_mask`` [B, M] and the optional eval ``mask`` [B].
      config: weights; a term with weight 0 is not computed.

    Returns:
      (loss, metrics): metrics has ``loss/total``, ``loss/image_caption``,
      ``acc/image_caption``, and when boxes are matched ``loss/box_l1``,
      ``loss/box_giou``, ``count/boxes``, ``count/matched`` (+ ``loss/box_l1_aux_{i}``,
      ``loss/box_giou_aux_{i}`` with aux_loss), ``loss/region_description``,
      ``acc/region_description`` (+ ``loss/global_description``, ``acc/global_description``). Accuracies are fractions in [0, 1]; losses are
      unweighted.
    """
    scale = jnp.exp(jnp.asarray(_get(outputs, "logit_scale", "outputs"), jnp.float32))
    image_embeddings = _get(outputs, "img/embedding", "outputs")
    batch_size = image_embeddings.shape[0]
    example_mask = jnp.asarray(batch["mask"], bool) if "mask" in batch else jnp.ones((batch_size,), bool)

    metrics: dict[str, jax.Array] = {}
    loss = jnp.zeros((), jnp.float32)
    if config.image_caption:
        caption_loss, caption_accuracy = image_caption_loss(
            config, image_embeddings, _get(outputs, "txt/caption", "outputs"), scale, example_mask)
        metrics["loss/image_caption"] = caption_loss
        metrics["acc/image_caption"] = caption_accuracy
        loss += config.image_caption * caption_loss

    use_descriptions = bool(config.region_description) and "txt/descriptions" in outputs
    if config.global_description and "txt/descriptions" in outputs:
        description_mask = jnp.asarray(_get(batch, "box_mask", "batch"), bool) & example_mask[:, None]
        global_loss, global_accuracy = contrastive.global_description_loss(
            image_embeddings, outputs["txt/descriptions"], description_mask, scale)
        metrics["loss/global_description"] = global_loss
        metrics["acc/global_description"] = global_accuracy
        loss += config.global_description * global_loss
    if "dec/boxes" in outputs and (config.uses_boxes or use_descriptions):
        pred_boxes = outputs["dec/boxes"]
        target_boxes = _get(batch, "boxes", "batch")
        box_mask = jnp.asarray(_get(batch, "box_mask", "batch"), bool)
        if target_boxes.shape != box_mask.shape + (4,) or box_mask.shape[0] != batch_size:
            raise ValueError(f"batch boxes {target_boxes.shape} / box_mask {box_mask.shape} do not match "
                             f"each other or the batch size {batch_size} of the outputs")
        target_mask = box_mask & example_mask[:, None]
        description_embeddings = outputs.get("txt/descriptions")
        needs_regions = use_descriptions or bool(config.match_similarity)
        region_embeddings = _get(outputs, "dec/region_embeddings", "outputs") if needs_regions else None
        if description_embeddings is not None and description_embeddings.shape[:2] != box_mask.shape:
            raise ValueError(f"outputs txt/descriptions {description_embeddings.shape} does not match "
                             f"batch box_mask {box_mask.shape}")

        count_boxes = jnp.sum(target_mask).astype(jnp.float32)
        num_boxes = jnp.maximum(count_boxes, 1.0)
        match_weights = dict(l1_weight=config.match_l1, giou_weight=config.match_giou)
        matches = matching.match_boxes(
            pred_boxes, target_boxes, target_mask, region_embeddings=region_embeddings,
            description_embeddings=description_embeddings, similarity_weight=config.match_similarity,
            **match_weights)
        metrics["count/boxes"] = count_boxes
        metrics["count/matched"] = jnp.sum(matches.valid).astype(jnp.float32)

        # Cheap once matched, so logged even when box weights are 0 ("noloc" ablation).
        l1, giou = box_losses(pred_boxes, target_boxes, matches, num_boxes)
        metrics["loss/box_l1"], metrics["loss/box_giou"] = l1, giou
        if config.uses_boxes:
            loss += config.box_factor * (config.box_l1 * l1 + config.box_giou * giou)
            if config.aux_loss:
                # Every intermediate layer (all but the last) re-matched on its own boxes, vmapped over layers.
                def layer_box_losses(boxes_of_layer):
                    layer_matches = matching.match_boxes(boxes_of_layer, target_boxes, target_mask, **match_weights)
                    return box_losses(boxes_of_layer, target_boxes, layer_matches, num_boxes)

                aux_l1, aux_giou = jax.vmap(layer_box_losses)(_get(outputs, "dec/layer_boxes", "outputs")[:-1])
                for i in range(aux_l1.shape[0]):
                    metrics[f"loss/box_l1_aux_{i}"], metrics[f"loss/box_giou_aux_{i}"] = aux_l1[i], aux_giou[i]
                loss += config.box_factor * (config.box_l1 * aux_l1.sum() + config.box_giou * aux_giou.sum())

        if use_descriptions:
            groups = config.negative_groups if config.description_negatives == "per_device" else 1
            description_loss, description_accuracy = region_description_loss(
                config, region_embeddings, description_embeddings, target_mask, matches.query_index,
                matches.target_index, matches.valid, scale, negative_groups=groups)
            metrics["loss/region_description"] = description_loss
            metrics["acc/region_description"] = description_accuracy
            loss += config.region_description * description_loss

    metrics["loss/total"] = loss
    return loss, metrics
