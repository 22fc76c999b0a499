"""Work the text tower skips (packed descriptions, length buckets) and fused attention: same results."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grain_jax import checkpoints
from grain_jax.batch import fake_batch
from grain_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from grain_jax.inference import objective
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
    assert text_batching.fit_batch(batch, (), ("caption_tokens", "description_tokens"), 0.6)[1]
    full_out, _, (full_loss, full_metrics) = run(attention_impl="explicit")
    out, _, (loss, metrics) = run(attention_impl="explicit", description_budget=0.6)
    np.testing.assert_allclose(out["txt/descriptions"][valid], full_out["txt/descriptions"][valid],
                               rtol=1e-6, atol=1e-7)
    assert not np.asarray(out["txt/descriptions"])[~valid].any()  # padding slots are zero
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    for key in full_metrics:
        np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_a_batch_over_the_budget_is_run_with_every_slot_and_never_silently_short(setup):
    batch, run = setup
    keys = ("caption_tokens", "description_tokens")
    assert not text_batching.fit_batch(batch, (), keys, 0.2)[1]  # 8 rows < the valid ones: the caller's cue
    model = create_model("grain-tiny", **SMALL, description_budget=0.2)
    assert model.every_description_slot() == create_model("grain-tiny", **SMALL, description_budget=1.0)
    out, _, _ = run(attention_impl="explicit", description_budget=0.2)  # run anyway: NaN, not fewer rows
    assert np.isnan(np.asarray(out["txt/descriptions"])).all()


def test_fit_batch_says_whether_the_descriptions_fit_the_packed_rows():
    keys = ("caption_tokens", "description_tokens")
    descriptions = np.zeros((4, 4, 6), np.int32)  # 16 slots; budget 0.5 packs 8 rows
    descriptions.reshape(16, 6)[:8, 0] = 7
    batch = {"caption_tokens": np.ones((4, 6), np.int32), "description_tokens": descriptions}
    assert text_batching.fit_batch(batch, (), keys, 0.5) == (batch, True)  # 8 valid: exactly the capacity
    descriptions.reshape(16, 6)[8, 0] = 7
    assert not text_batching.fit_batch(batch, (), keys, 0.5)[1]  # 9 valid
    assert text_batching.fit_batch(batch, (), keys, 1.0)[1]  # no packing: every batch fits
    assert text_batching.fit_batch(batch, (), ("caption_tokens",), 0.5)[1]  # a CLIP model: no descriptions


def test_packing_has_no_in_step_fallback_holding_both_branches(setup):
    """Under autodiff an in-step cond between the packed and the every-slot encoding keeps the residuals of both;
    the packed step must need fewer temporaries than the every-slot one, not more."""
    batch, _ = setup
    params = nn.unbox(create_model("grain-tiny", **SMALL).init(
        jax.random.key(0), batch["images"], batch["caption_tokens"], batch["description_tokens"])["params"])

    def temporaries(budget):
        model = create_model("grain-tiny", **SMALL, attention_impl="explicit", description_budget=budget)

        def loss(params, batch):  # the batch an argument, as in training (a constant one folds the cond away)
            out, _ = model.apply({"params": params}, batch["images"], batch["caption_tokens"],
                                 batch["description_tokens"])
            return total_loss(out, batch, LossConfig())[0]
        return jax.jit(jax.grad(loss)).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    assert temporaries(0.6) < 0.95 * temporaries(1.0)  # with the former in-step cond: 1.8x


def _tokens(eot_positions, length):
    """[N, length] rows SOT ... EOT with the EOT at each position (None: an all-zero padding row)."""
    tokens = np.zeros((len(eot_positions), length), np.int32)
    for row, eot in enumerate(eot_positions):
        if eot is not None:
            tokens[row, :eot] = 1000 + row
            tokens[row, 0], tokens[row, eot] = 49406, 49407
    return tokens


@pytest.mark.parametrize("eots,padded,expected", [
    ([9, 3], 40, 16),               # EOT at 9 needs 10 positions: bucket 16
    ([7, None], 40, 8),             # EOT at 7 fits 8 exactly; the padding row needs nothing
    ([None, None], 40, 8),          # only padding: the shortest bucket
    ([32, 1], 40, 40),              # 33 positions: no bucket below 40 holds them, the padded length
    ([39, 2], 40, 40),              # EOT at the last position (a truncated text): the full length
    ([9], 12, 12),                  # buckets at or above the padded length are never chosen
])
def test_host_rule_picks_the_shortest_bucket_that_holds_the_last_eot(eots, padded, expected):
    tokens = _tokens(eots, padded)
    cut = text_batching.fit_texts({"caption_tokens": tokens, "boxes": np.ones(3)}, (32, 8, 16, 77),
                                  ("caption_tokens",))
    assert cut["caption_tokens"].shape == (len(eots), expected)
    np.testing.assert_array_equal(cut["caption_tokens"], tokens[:, :expected])
    assert cut["boxes"].shape == (3,)  # other keys untouched


def test_host_rule_cuts_each_text_array_to_its_own_bucket():
    captions = _tokens([5, 2], 24)
    descriptions = _tokens([12, None, 3, None], 16).reshape(2, 2, 16)  # [B, M, Ld]
    cut = text_batching.fit_texts({"caption_tokens": captions, "description_tokens": descriptions}, (8, 12),
                                  ("caption_tokens", "description_tokens"))
    assert cut["caption_tokens"].shape == (2, 8) and cut["description_tokens"].shape == (2, 2, 16)
    assert text_batching.fit_texts({"caption_tokens": captions}, (), ("caption_tokens",))["caption_tokens"].shape \
        == (2, 24)  # no buckets: as it came


def test_every_process_cuts_to_the_longest_need_of_any_process(monkeypatch):
    """Two processes: this one's captions need 4 positions, the other's 12, so both cut to 16 (one global shape)."""
    gathered = []

    def allgather(needed):  # what multihost_utils.process_allgather returns: [processes, ...]
        gathered.append(needed)
        return np.stack([needed, np.array([12, 0], np.int32)])

    monkeypatch.setattr(text_batching.jax, "process_count", lambda: 2)
    monkeypatch.setattr(text_batching.multihost_utils, "process_allgather", allgather)
    batch = {"caption_tokens": _tokens([3], 40), "description_tokens": _tokens([5], 24)[None]}
    cut = text_batching.fit_texts(batch, (8, 16), ("caption_tokens", "description_tokens"))
    assert [n.tolist() for n in gathered] == [[4, 6]]  # one collective for both arrays
    assert cut["caption_tokens"].shape == (1, 16) and cut["description_tokens"].shape == (1, 1, 8)


@pytest.mark.parametrize("buckets", [[1], [16, 0], "16,32", [8.0], [True]])
def test_bad_buckets_name_the_config_key(buckets):
    with pytest.raises(ValueError, match=r"config\.data\.text_length_buckets must be token lengths >= 2"):
        text_batching.fit_texts({"caption_tokens": _tokens([3], 16)}, buckets, ("caption_tokens",))


def test_the_old_model_option_names_the_new_key():
    with pytest.raises(ValueError, match=r"no longer a model option: set config\.data\.text_length_buckets"):
        create_model("grain-tiny", text_length_buckets=(16, 32))


def test_a_checkpoint_written_with_the_old_model_option_still_loads(tmp_path):
    checkpoints.write_model_spec(str(tmp_path), checkpoints.ModelSpec(
        "grain-tiny", model_overrides={"image_size": 32, "text_length_buckets": [16, 32]}, image_size=32))
    spec = checkpoints.read_model_spec(str(tmp_path))
    assert spec.model_overrides == {"image_size": 32}
    assert spec.create_model().image_size == 32


def test_a_cut_batch_gives_the_losses_and_gradients_of_the_full_one(setup):
    batch, _ = setup
    # Descriptions (<= 16 tokens) zero padded to 24, as real data is to 77.
    batch = dict(batch, description_tokens=np.pad(batch["description_tokens"], ((0, 0), (0, 0), (0, 8))))
    model = create_model("grain-tiny", **SMALL, attention_impl="explicit")
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["images"], batch["caption_tokens"],
                                          batch["description_tokens"])["params"])
    longest = text_batching.needed_length(batch["caption_tokens"])
    cut = text_batching.fit_texts(batch, (8, longest, 20), objective.text_keys(model))
    assert cut["caption_tokens"].shape[-1] == longest < batch["caption_tokens"].shape[-1]
    assert cut["description_tokens"].shape[-1] == 20
    gradients = jax.jit(jax.value_and_grad(functools.partial(
        objective.forward_loss, model, LossConfig(), train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD), has_aux=True))
    (full_loss, full_metrics), full_grads = gradients(params, batch)
    (loss, metrics), grads = gradients(params, cut)
    # Equal up to fp32 reduction order (XLA tiles a shorter sequence differently).
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
    for key in full_metrics:
        np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(full_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_capacity_helper():
    assert text_batching.description_capacity(160, 0.75) == 120
    assert text_batching.description_capacity(10, 0.75) == 8
    assert text_batching.description_capacity(5, 0.9) == 5
    with pytest.raises(ValueError, match="description_budget must be in"):
        text_batching.description_capacity(10, 0)
