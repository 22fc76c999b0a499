"""Work the text tower skips (packed descriptions, length buckets) and fused attention: same results."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grain_jax.batch import fake_batch
from grain_jax.losses import LossConfig, total_loss
from grain_jax.models import create_model, layers, text_batching

SMALL = dict(image_size=32, text_layers=1, decoder_layers=1)


@pytest.fixture(scope="module")
def setup():
    batch = fake_batch(8, 32, caption_length=24, description_length=16, seed=3)
    model = create_model("grain-tiny", **SMALL)
    params = jax.jit(model.init)(jax.random.key(0), batch["images"], batch["caption_tokens"],
                                 batch["description_tokens"])["params"]

    def run(**overrides):
        variant = create_model("grain-tiny", **SMALL, **overrides)

        def forward(params, batch):
            out, aux = variant.apply({"params": params}, batch["images"], batch["caption_tokens"],
                                     batch["description_tokens"])
            return out, aux, total_loss(out, batch, LossConfig())
        return jax.jit(forward)(nn.unbox(params), batch)
    return batch, run


def test_fused_attention_matches_explicit():
    rng = np.random.default_rng(0)
    q, kv = rng.normal(size=(2, 5, 32)).astype(np.float32), rng.normal(size=(2, 7, 32)).astype(np.float32)
    for causal, qk_norm, inputs in [(True, False, (q,)), (False, True, (q,)), (False, False, (q, kv, kv))]:
        outs = {}
        for impl in ("explicit", "xla"):
            attn = layers.MultiHeadAttention(4, qk_norm=qk_norm, causal=causal, attention_impl=impl)
            variables = nn.Module.init(attn, jax.random.key(1), *inputs)  # the `init` field shadows the method
            outs[impl] = attn.apply(variables, *inputs)
        np.testing.assert_allclose(outs["xla"], outs["explicit"], rtol=1e-5, atol=1e-6)


def test_attention_implementation_choice(monkeypatch):
    assert layers.attention_implementation("auto", jnp.bfloat16) == "explicit"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.attention_implementation("auto", jnp.bfloat16) == "cudnn"
    assert layers.attention_implementation("auto", jnp.float32) == "explicit"  # cuDNN's flash takes no fp32
    assert layers.attention_implementation("explicit", jnp.bfloat16) == "explicit"
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'; choose from"):
        layers.attention_implementation("flash", jnp.float32)


def test_packed_descriptions_give_identical_losses(setup):
    batch, run = setup
    valid = batch["box_mask"]
    assert 0 < valid.sum() <= text_batching.description_capacity(valid.size, 0.6) < valid.size
    full_out, _, (full_loss, full_metrics) = run(attention_impl="explicit")
    out, _, (loss, metrics) = run(attention_impl="explicit", description_budget=0.6)
    assert float(out["txt/description_overflow"]) == 0.0
    np.testing.assert_allclose(out["txt/descriptions"][valid], full_out["txt/descriptions"][valid],
                               rtol=1e-6, atol=1e-7)
    assert not np.asarray(out["txt/descriptions"])[~valid].any()  # padding slots are zero
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for key in full_metrics:
        np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_description_overflow_encodes_every_slot_and_says_so(setup):
    batch, run = setup
    full_out, _, (full_loss, _) = run(attention_impl="explicit")
    out, _, (loss, _) = run(attention_impl="explicit", description_budget=0.2)  # 8 rows < the valid ones
    assert float(out["txt/description_overflow"]) == 1.0
    valid = batch["box_mask"]
    np.testing.assert_allclose(out["txt/descriptions"][valid], full_out["txt/descriptions"][valid],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)


def test_length_buckets_give_the_same_embeddings(setup):
    batch, run = setup
    longest = int(np.argmax(batch["caption_tokens"], -1).max()) + 1
    full_out, full_aux, _ = run(attention_impl="explicit")
    out, aux, _ = run(attention_impl="explicit", text_length_buckets=[8, longest, 20])
    # Equal up to fp32 reduction order (XLA tiles a shorter sequence differently), as padding is today.
    for key in ("txt/caption", "txt/descriptions"):
        np.testing.assert_allclose(out[key], full_out[key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(aux["txt/caption_features"][:, :longest], full_aux["txt/caption_features"][:, :longest],
                               rtol=1e-5, atol=1e-5)
    assert not np.asarray(aux["txt/caption_features"])[:, longest:].any()


def test_bucket_and_capacity_helpers():
    assert text_batching.bucket_lengths([32, 8, 77, 16], 40) == (8, 16, 32, 40)
    tokens = np.zeros((3, 40), np.int32)
    tokens[:, 0], tokens[0, 9], tokens[1, 3] = 49406, 49407, 49407
    assert int(text_batching.bucket_index(tokens, (8, 16, 32, 40))) == 1  # EOT at 9 needs 10 positions
    assert text_batching.description_capacity(160, 0.75) == 120
    assert text_batching.description_capacity(10, 0.75) == 8
    assert text_batching.description_capacity(5, 0.9) == 5
    with pytest.raises(ValueError, match="description_budget must be in"):
        text_batching.description_capacity(10, 0)
    with pytest.raises(ValueError, match="text_length_buckets must be lengths >= 2"):
        text_batching.bucket_lengths([1], 16)
