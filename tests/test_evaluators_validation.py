"""Validation-loss evaluator over records written with the real record writer."""
import io
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import evaluator_fakes as fakes
from grain_jax.checkpoints import ModelSpec
from grain_jax.data import pipeline, records, transforms
from grain_jax.data.tokenizer import tokenize
from grain_jax.evaluators import common
from grain_jax.inference import InferenceModel
from grain_jax.losses import LossConfig, total_loss
from grain_jax.models import create_model
from grain_jax.train import step as step_lib
from grain_jax.train.state import TrainState

RESOLUTION, MAX_BOXES, NUM_VALIDATION = 16, 5, 11


def _record(index):
    """Image of label index % 10, a caption naming the label, index % 4 boxes."""
    jpeg = io.BytesIO()
    Image.fromarray(fakes.label_image(index % 10, RESOLUTION)).save(jpeg, "PNG")
    rng = np.random.default_rng(index)
    box_mask = np.arange(MAX_BOXES) < index % 4
    boxes = np.concatenate([rng.uniform(0.3, 0.7, (MAX_BOXES, 2)), rng.uniform(0.1, 0.4, (MAX_BOXES, 2))], -1)
    return {
        "id": f"r{index}", "image": jpeg.getvalue(),
        "caption_tokens": tokenize([f"a photo of {index % 10}"])[0],
        "mllm_caption_tokens": np.zeros(77, np.int32), "has_mllm_caption": False,
        "description_tokens": tokenize(["a thing"] * MAX_BOXES) * box_mask[:, None],
        "boxes": (boxes * box_mask[:, None]).astype(np.float32), "box_mask": box_mask,
        "box_scores": box_mask.astype(np.float32),
    }


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("val_records"))
    features = records.features(RESOLUTION, MAX_BOXES, 77)
    path = os.path.join(directory, "validation-0.tmp_shard")
    num_bytes = records.write_shard(path, [features.serialize_example(_record(i)) for i in range(NUM_VALIDATION)])
    records.publish_split(directory, "validation", [path])
    records.write_tfds_metadata(directory, features, {"validation": [NUM_VALIDATION]},
                                {"validation": num_bytes}, "validation evaluator test")
    return {"dir": directory, "eval_split": "validation", "image_size": fakes.IMAGE_SIZE, "caption_length": 32,
            "description_length": 8, "num_workers": 0, "prefetch": 0}


@pytest.mark.parametrize("buckets", [(), (8, 16)], ids=["full_length", "length_buckets"])
def test_validation_losses_weight_batches_by_real_examples(data_config, buckets, monkeypatch):
    """With data.text_length_buckets the captions (at most 7 tokens, padded to 32) are cut to 8 before the step,
    and the losses are those of the full-length oracle."""
    from grain_jax.evaluators import validation
    fit_batch, caption_lengths = validation.text_batching.fit_batch, []

    def recording_fit_batch(*args):
        batch, packed = fit_batch(*args)
        caption_lengths.append(batch["caption_tokens"].shape[-1])
        return batch, packed

    monkeypatch.setattr(validation.text_batching, "fit_batch", recording_fit_batch)
    model = fakes.make_inference_model(fakes.NAMES)
    (_, evaluator, every, prefix), = common.from_config(
        {"val": {"type": "validation", "every_steps": 5, "data": {**data_config, "text_length_buckets": buckets},
                 "batch_size": 8}})
    got = dict(evaluator.run(model))
    assert caption_lengths == [8 if buckets else 32] * 2

    # Oracle: each batch's losses on its real examples only (padding sliced off), weighted by their count.
    expected, total = {}, 0
    loss_fn = jax.jit(lambda outputs, batch: total_loss(outputs, batch, LossConfig()))
    for batch in pipeline.make_eval_iterator(data_config, global_batch_size=8):
        real = {k: v[batch["mask"]] for k, v in batch.items() if k != "mask"}
        pixels = transforms.normalize(real["images"], model.spec.mean, model.spec.std)
        outputs, _ = model.model.apply({"params": model.params}, pixels, real["caption_tokens"],
                                       real["description_tokens"])
        _, metrics = loss_fn(outputs, real)
        for key, value in metrics.items():
            if key.startswith(("loss/", "acc/")):
                expected[key] = expected.get(key, 0.0) + float(value) * len(real["images"])
        total += len(real["images"])
    assert total == NUM_VALIDATION and every == 5
    assert set(got) == {f"val/{k}" for k in expected} and "val/loss/image_caption" in got
    for key, value in expected.items():
        assert got[f"val/{key}"] == pytest.approx(value / total, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("model_name", ["grain-tiny", "clip-tiny"])
def test_validation_losses_are_the_train_step_losses(data_config, model_name):
    """One eval batch without padding: the evaluator reports the train step's losses on the same params and batch."""
    data = {**data_config, "image_size": RESOLUTION}
    # No dropout, so the train step's train=True forward computes what validation's train=False does.
    model = create_model(model_name, image_size=RESOLUTION, decoder_dropout=0.0)
    spec = ModelSpec(model_name=model_name, image_size=RESOLUTION, caption_length=32, description_length=8)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, RESOLUTION, RESOLUTION, 3)),
                                 jnp.zeros((1, 32), jnp.int32), jnp.zeros((1, MAX_BOXES, 8), jnp.int32))["params"])
    batch = next(iter(pipeline.make_eval_iterator(data, global_batch_size=NUM_VALIDATION)))
    assert batch["mask"].all()

    tx = optax.sgd(0.0)
    train_step = jax.jit(step_lib.make_train_step(model, LossConfig(), tx, lambda count: jnp.zeros(()),
                                                  mean=spec.mean, std=spec.std))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    _, trained = train_step(state, {k: v for k, v in batch.items() if k != "mask"}, jax.random.PRNGKey(0))

    (_, evaluator, _, _), = common.from_config({"val": {"type": "validation", "data": data,
                                                        "batch_size": NUM_VALIDATION}})
    got = dict(evaluator.run(InferenceModel(model, params, spec)))
    expected = {f"val/{k}": float(v) for k, v in trained.items() if k.startswith(("loss/", "acc/"))}
    assert set(got) == set(expected) and "val/loss/total" in got
    if model_name == "grain-tiny":
        assert "val/loss/region_description" in got
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
