"""A ``config.sharding_rules`` override of the ``batch`` logical axis moves every batch (8 fake CPU devices):
the train step's inputs, the input pipeline's global arrays, validation and inference."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import _train_utils
from grain_jax import inference, sharding
from grain_jax.data import pipeline
from grain_jax.train import trainer

BATCH_ON_DATA = (("batch", "data"),)  # batch over "data" only: replicated over "fsdp"


def test_batch_sharding_follows_the_rules():
    mesh = sharding.create_mesh((4, 2, 1))
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert sharding.batch_shards(mesh.shape) == 8
    rules = sharding.axis_rules(BATCH_ON_DATA)
    assert sharding.batch_sharding(mesh, rules).spec == PartitionSpec("data")
    assert sharding.batch_shards(mesh.shape, rules) == 4
    assert sharding.batch_shards(mesh.shape, sharding.axis_rules((("batch", None),))) == 1


def test_validate_config_counts_the_batch_shards_of_the_rules(tmp_path):
    config = _train_utils.runlocal_config(str(tmp_path), mesh_shape=(4, 2, 1), global_batch_size=4)
    with pytest.raises(ValueError, match=r"^global_batch_size=4 must be a positive multiple of the batch shards "
                                         r"\(8 = data x fsdp\) times grad_accum_steps \(1\)$"):
        trainer.validate_config(config, num_devices=8)
    config.sharding_rules = BATCH_ON_DATA
    trainer.validate_config(config, num_devices=8)  # 4 batch shards
    config.global_batch_size = 6
    with pytest.raises(ValueError, match=r"\(4 = data\) times"):
        trainer.validate_config(config, num_devices=8)


def test_training_and_validation_batches_follow_the_batch_rule(tmp_path, monkeypatch):
    placed = []
    to_global = pipeline.to_global

    def recording(batch, batch_sharding):
        arrays = to_global(batch, batch_sharding)
        placed.append({key: value.sharding.spec for key, value in arrays.items()})
        return arrays

    monkeypatch.setattr(pipeline, "to_global", recording)
    config = _train_utils.runlocal_config(str(tmp_path / "data"), mesh_shape=(4, 2, 1), global_batch_size=4,
                                          sharding_rules=BATCH_ON_DATA, total_steps=2)
    config.evals = {"val": dict(type="validation", data=config.data, loss=config.loss, batch_size=4,
                                max_batches=1)}
    final = trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert np.isfinite(final["eval/val/loss/total"])
    # >= 2 train batches (the prefetcher may have fetched a third) and 1 validation batch.
    assert len(placed) >= 3
    assert all(spec == PartitionSpec("data") for batch in placed for spec in batch.values()), placed


def test_inference_batches_follow_the_batch_rule():
    mesh = sharding.create_mesh((4, 2, 1))
    model = inference.load("random:clip-tiny", mesh=mesh, rules=BATCH_ON_DATA, batch_size=2)
    assert model.batch_size == 4  # rounded up to the 4 batch shards, not 8
    seen = []
    encode_text = model._encode_text
    model._encode_text = lambda params, tokens: (seen.append(tokens.sharding.spec), encode_text(params, tokens))[1]
    embeddings = model.encode_texts(["a red ball", "a blue cube"])
    assert seen and all(spec == PartitionSpec("data") for spec in seen), seen
    unsharded = inference.load("random:clip-tiny").encode_texts(["a red ball", "a blue cube"])
    np.testing.assert_allclose(embeddings, unsharded, atol=1e-5)
    assert jax.device_count() == 8
