"""On-device Hungarian matching against scipy's linear_sum_assignment."""
import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from grain_jax.losses import matching

hungarian_match = jax.jit(matching.hungarian_match)
match_boxes = jax.jit(matching.match_boxes, static_argnames=("l1_weight", "giou_weight", "similarity_weight"))


def _random_problem(rng, batch, queries, targets):
    cost = rng.normal(size=(batch, queries, targets)).astype(np.float32)
    num_valid = rng.integers(0, targets + 1, size=batch)
    num_valid[0] = targets  # always one fully valid and one empty image
    num_valid[1] = 0
    target_mask = np.arange(targets)[None] < num_valid[:, None]
    return cost, target_mask


def _check_against_scipy(cost, target_mask, got):
    """The matched real pairs form an optimal assignment of the real targets."""
    query_index, target_index, valid = map(np.asarray, got)
    for b in range(cost.shape[0]):
        real = np.flatnonzero(target_mask[b])
        rows, cols = linear_sum_assignment(cost[b][:, real])
        assert valid[b].sum() == min(cost.shape[1], real.size)
        np.testing.assert_array_equal(valid[b], target_mask[b, target_index[b]])
        # one-to-one
        assert len(set(query_index[b])) == query_index.shape[1]
        assert len(set(target_index[b])) == target_index.shape[1]
        got_cost = cost[b, query_index[b][valid[b]], target_index[b][valid[b]]].sum()
        np.testing.assert_allclose(got_cost, cost[b][:, real][rows, cols].sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries, targets", [(5, 5), (7, 4), (3, 6)], ids=["square", "tall", "wide"])
def test_hungarian_equals_scipy_with_padded_targets(queries, targets):
    rng = np.random.default_rng(queries * 10 + targets)
    cost, target_mask = _random_problem(rng, 16, queries, targets)
    got = hungarian_match(cost, target_mask)
    assert got.query_index.shape == (16, min(queries, targets))
    _check_against_scipy(cost, target_mask, got)


def test_vmap_over_an_extra_axis_equals_per_slice():
    rng = np.random.default_rng(1)
    cost, target_mask = _random_problem(rng, 4, 5, 5)
    stacked = jax.jit(jax.vmap(matching.hungarian_match))(np.stack([cost, cost[::-1]]),
                                                           np.stack([target_mask, target_mask[::-1]]))
    single = hungarian_match(cost, target_mask)
    for a, b in zip(stacked, single):
        np.testing.assert_array_equal(a[0], b)
    _check_against_scipy(cost[::-1], target_mask[::-1], [x[1] for x in stacked])


def _numpy_giou(a, b):
    """Reference GIoU of cxcywh boxes a [N, 4] x b [M, 4], written out in numpy."""
    a = np.concatenate([a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2], -1)[:, None]
    b = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)[None]
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a) + area(b) - inter
    enclose_wh = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
    enclose = enclose_wh[..., 0] * enclose_wh[..., 1]
    return inter / (union + 1e-4) - (enclose - union) / enclose


def _random_boxes(rng, shape):
    centre = rng.uniform(0.2, 0.8, size=shape + (2,))
    size = rng.uniform(0.05, 0.5, size=shape + (2,))
    return np.concatenate([centre, size], -1).astype(np.float32)


@pytest.mark.parametrize("queries", [5, 3])
def test_box_matching_minimises_reference_cost(queries):
    rng = np.random.default_rng(queries)
    batch, targets = 8, 5
    pred = _random_boxes(rng, (batch, queries))
    target = _random_boxes(rng, (batch, targets))
    target_mask = np.arange(targets)[None] < rng.integers(0, targets + 1, size=batch)[:, None]
    target = target * target_mask[..., None]  # padded slots are all-zero, as in the batch contract
    cost = np.stack([5 * np.abs(pred[b][:, None] - target[b][None]).sum(-1) - 2 * _numpy_giou(pred[b], target[b])
                     for b in range(batch)])
    np.testing.assert_allclose(
        matching.matching_cost(pred, target, l1_weight=5.0, giou_weight=2.0), cost, rtol=1e-5, atol=1e-5)
    _check_against_scipy(cost, target_mask, match_boxes(pred, target, target_mask))


def test_nan_predictions_still_match_every_real_target():
    rng = np.random.default_rng(3)
    pred = _random_boxes(rng, (2, 5))
    pred[0, 1] = np.nan
    pred[1] = np.inf
    target = _random_boxes(rng, (2, 5))
    target_mask = np.array([[True] * 4 + [False], [True] * 2 + [False] * 3])
    got = match_boxes(pred, target, target_mask)
    np.testing.assert_array_equal(np.sort(np.asarray(got.target_index)[np.asarray(got.valid)]),
                                  [0, 0, 1, 1, 2, 3])
    assert np.asarray(got.valid).sum() == 6


def test_similarity_cost_breaks_box_ties():
    rng = np.random.default_rng(4)
    batch, queries, dim = 2, 5, 16
    descriptions = rng.normal(size=(batch, queries, dim)).astype(np.float32)
    permutation = np.stack([rng.permutation(queries) for _ in range(batch)])
    regions = np.take_along_axis(descriptions, permutation[..., None], axis=1)  # query q shows target perm[q]
    same_box = np.full((batch, queries, 4), 0.5, np.float32)  # every box cost is equal
    got = match_boxes(same_box, same_box, np.ones((batch, queries), bool), region_embeddings=regions,
                      description_embeddings=descriptions, similarity_weight=1.0)
    for b in range(batch):
        np.testing.assert_array_equal(permutation[b][np.asarray(got.query_index[b])], got.target_index[b])


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="target_mask"):
        matching.hungarian_match(np.zeros((2, 5, 5)), np.ones((2, 4), bool))
