"""The text tower under tensor parallelism never all-gathers the full token batch (compiled HLO)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grain_jax import sharding
from grain_jax.models import vocab_parallel
from grain_jax.models.text import TextTransformer

BATCH, LENGTH, VOCAB = 32, 16, 1000
MODEL = TextTransformer(width=64, depth=1, num_heads=4, context_length=LENGTH, vocab_size=VOCAB, embed_dim=32)


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in compiled HLO text."""
    shapes = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo)
    return [tuple(int(d) for d in s.split(",") if d) for s in shapes]


@pytest.fixture(scope="module")
def setup():
    mesh = sharding.create_mesh((2, 2, 2))  # data x fsdp x tensor: 4 batch shards, vocab over 2
    rules = sharding.axis_rules()
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: MODEL.init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32)))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    variables = jax.jit(lambda: nn.unbox(MODEL.init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))),
                        out_shardings=shardings)()
    tokens = np.random.default_rng(0).integers(1, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
    return mesh, rules, variables, tokens


def _loss(variables, tokens):
    embedding, features = MODEL.apply(variables, tokens)
    return jnp.sum(embedding ** 2) + jnp.mean(features)


def _compiled_hlo(setup):
    mesh, rules, variables, tokens = setup
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(jax.value_and_grad(_loss)).lower(variables, tokens).compile().as_text()


def test_no_all_gather_of_the_token_batch(setup, monkeypatch):
    full_batch = [shape for shape in _all_gather_shapes(_compiled_hlo(setup)) if shape[:1] == (BATCH,)]
    assert full_batch == []
    # The plain jnp.take lookup does gather the whole batch (what the sharded lookup fixes).
    monkeypatch.setattr(vocab_parallel, "lookup", lambda table, ids: jnp.take(table, ids, axis=0))
    assert any(shape[:2] == (BATCH, LENGTH) for shape in _all_gather_shapes(_compiled_hlo(setup)))


def test_sharded_lookup_equals_take(setup):
    mesh, rules, variables, tokens = setup
    grad_fn = jax.jit(jax.value_and_grad(_loss))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        loss, grads = grad_fn(variables, tokens)
    want_loss, want_grads = grad_fn(jax.device_get(variables), np.asarray(tokens))  # no mesh: jnp.take
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for grad, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        # fp32 sums in another order on the mesh: tolerance relative to the leaf's largest entry.
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
