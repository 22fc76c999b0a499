"""Box conversions, IoU and GIoU against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grain_jax.losses import boxes


def test_cxcywh_to_xyxy_hand_values():
    got = boxes.cxcywh_to_xyxy(jnp.array([0.5, 0.5, 0.2, 0.4]))
    np.testing.assert_allclose(got, [0.4, 0.3, 0.6, 0.7], atol=1e-7)
    np.testing.assert_allclose(boxes.xyxy_to_cxcywh(got), [0.5, 0.5, 0.2, 0.4], atol=1e-7)


def test_round_trips_keep_leading_dims():
    rng = np.random.default_rng(0)
    cxcywh = rng.uniform(0.05, 0.95, size=(3, 5, 4)).astype(np.float32)
    xyxy = boxes.cxcywh_to_xyxy(cxcywh)
    assert xyxy.shape == (3, 5, 4) and xyxy.dtype == jnp.float32
    np.testing.assert_allclose(boxes.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-6)
    corners = np.sort(rng.uniform(size=(7, 2, 2)), axis=1).transpose(0, 2, 1).reshape(7, 4)[:, [0, 2, 1, 3]]
    np.testing.assert_allclose(boxes.cxcywh_to_xyxy(boxes.xyxy_to_cxcywh(corners)), corners, atol=1e-6)


# (box1, box2, IoU, GIoU), xyxy; IoU uses the reference's union + 1e-4.
HAND_CASES = [
    # overlap 1, union 7, enclosing box 3x3 = 9
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / (7 + 1e-4), 1 / (7 + 1e-4) - 2 / 9),
    # disjoint side by side: union 2, enclosing box 3x1
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),
    # identical boxes: GIoU == IoU (enclose == union)
    ([0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.5, 0.6], 0.16 / (0.16 + 1e-4), 0.16 / (0.16 + 1e-4)),
    # nested: inner 1x1 inside 2x2, enclose == union
    ([0, 0, 2, 2], [0.5, 0.5, 1.5, 1.5], 1 / (4 + 1e-4), 1 / (4 + 1e-4)),
    # far apart diagonally: union 2, enclose 4x4 = 16
    ([0, 0, 1, 1], [3, 3, 4, 4], 0.0, -14 / 16),
]


@pytest.mark.parametrize("box1, box2, want_iou, want_giou", HAND_CASES)
def test_iou_and_giou_hand_values(box1, box2, want_iou, want_giou):
    np.testing.assert_allclose(boxes.iou(jnp.array(box1), jnp.array(box2)), want_iou, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(boxes.generalized_iou(jnp.array(box1), jnp.array(box2)), want_giou, rtol=1e-5,
                               atol=1e-7)
    # symmetric
    np.testing.assert_allclose(boxes.generalized_iou(jnp.array(box2), jnp.array(box1)), want_giou, rtol=1e-5,
                               atol=1e-7)


def test_pairwise_matches_elementwise():
    set1 = np.array([case[0] for case in HAND_CASES], np.float32)
    set2 = np.array([case[1] for case in HAND_CASES], np.float32)[:4]
    pairwise_giou = boxes.pairwise_generalized_iou(set1, set2)
    pairwise_iou = boxes.pairwise_iou(set1, set2)
    assert pairwise_giou.shape == (5, 4)
    one_giou, one_iou = jax.jit(boxes.generalized_iou), jax.jit(boxes.iou)  # one compile, 20 calls
    for i in range(5):
        for j in range(4):
            np.testing.assert_allclose(pairwise_giou[i, j], one_giou(set1[i], set2[j]), atol=1e-6)
            np.testing.assert_allclose(pairwise_iou[i, j], one_iou(set1[i], set2[j]), atol=1e-6)
    # batched pairwise: [B, N, 4] x [B, M, 4] -> [B, N, M]
    batched = boxes.pairwise_generalized_iou(np.stack([set1, set1]), np.stack([set2, set2]))
    np.testing.assert_allclose(batched, np.stack([pairwise_giou] * 2), atol=1e-6)


def test_degenerate_padding_boxes_give_finite_values_and_gradients():
    zero = jnp.zeros((4,))
    assert float(boxes.generalized_iou(zero, zero)) == 0.0  # 0 / (0 + eps) - 0, no 0 / 0
    pred = jnp.array([0.5, 0.5, 0.0, 0.0])  # point box (cxcywh) vs zero padding
    grad = jax.grad(lambda p: boxes.generalized_iou(boxes.cxcywh_to_xyxy(p), zero))(pred)
    assert np.all(np.isfinite(grad))
    grad = jax.grad(lambda p: boxes.generalized_iou(p, zero))(zero)
    assert np.all(np.isfinite(grad))
