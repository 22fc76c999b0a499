"""benchmarks/step_profile.py: compiled-HLO instructions of a small train step map to the op categories."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import _train_utils
from grain_jax.models import layers


def _step_profile():
    path = os.path.join(_train_utils.REPO, "benchmarks", "step_profile.py")
    spec = importlib.util.spec_from_file_location("step_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class GrainModel(nn.Module):  # named as ours: the categories read op_name paths GrainModel/.../attn, /mlp, /norm1
    @nn.compact
    def __call__(self, x):
        return layers.EncoderBlock(num_heads=2, mlp_dim=32, activation="quick_gelu", name="blocks_0")(x).sum()


def test_compiled_step_instructions_fall_into_categories():
    sp = _step_profile()
    model, tx = GrainModel(), optax.adamw(1e-3)
    x = jnp.ones((2, 5, 16))
    params = model.init(jax.random.key(0), x)
    opt_state = tx.init(params)

    def step(params, opt_state):
        grads = jax.grad(lambda p: model.apply(p, x))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    instructions = sp._hlo_instructions(jax.jit(step).lower(params, opt_state).compile().as_text())
    categories = {sp._xla_category(*value) for value in instructions.values()}
    assert {sp.LINEAR, sp.ATTENTION, sp.NORM, sp.ACTIVATION, sp.OPTIMIZER} <= categories
    # Each instruction whose source is the block's MLP activation, a LayerNorm or the optimizer lands there.
    for opcode, op_name, body in instructions.values():
        category = sp._xla_category(opcode, op_name, body)
        if " dot(" in body or opcode == "dot":
            assert category in (sp.LINEAR, sp.ATTENTION), op_name
        elif opcode == "fusion" and "GrainModel" in op_name and "/norm1/" in op_name:
            assert category in (sp.NORM, sp.COPY), op_name


def test_torch_categories():
    sp = _step_profile()
    assert sp._torch_category("aten::addmm") == sp.LINEAR
    assert sp._torch_category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == sp.ATTENTION
    assert sp._torch_category("aten::native_layer_norm_backward") == sp.NORM
    assert sp._torch_category("aten::sigmoid") == sp.ACTIVATION
    assert sp._torch_category("aten::copy_") == sp.COPY
