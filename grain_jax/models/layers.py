"""Building blocks shared by the image tower, the text tower and the grounding decoder.

Parameter layouts follow PyTorch closely so the authors' weights convert with a
transpose and a reshape (x = activations, W = width, H = heads, Dh = W // H):

| parameter               | shape           | PyTorch source                                   |
|-------------------------|-----------------|--------------------------------------------------|
| attention `qkv_kernel`  | [W, 3, H, Dh]   | `in_proj_weight` / `qkv.weight` [3W, W], `.T` then reshape |
| attention `qkv_bias`    | [3, H, Dh]      | `in_proj_bias` / `qkv.bias` [3W]                 |
| attention `out_kernel`  | [H, Dh, W]      | `out_proj.weight` / `proj.weight` [W, W], `.T` then reshape |
| attention `out_bias`    | [W]             | `out_proj.bias` / `proj.bias`                    |
| `nn.Dense` `kernel`     | [in, out]       | `weight.T`                                       |

Numerics: LayerNorm, attention logits and softmax run in float32; matmuls run in
the compute ``dtype``; the residual stream stays float32.

Attention (see :func:`attention_implementation`): on GPU in bf16/fp16 cuDNN's fused flash attention
through ``jax.nn.dot_product_attention``; elsewhere the explicit einsum-softmax-einsum, which is also
the path for dropout on the attention probabilities (the fused kernels have none). On CPU the
explicit path is 7-15% faster than ``jax.nn.dot_product_attention``'s XLA one (causal [48, 77, 384],
12 heads, forward + backward, interleaved; ``attention_impl="xla"`` selects that one).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from flax.linen.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
Initializer = Callable[..., jax.Array]

# Logical axes of token activations: [batch, tokens, width].
ACT_AXES = ("batch", "seq", "act_embed")

# PyTorch's nn.Linear / nn.Conv2d default weight init, kaiming-uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
XAVIER_UNIFORM = nn.initializers.xavier_uniform()

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf GELU (timm / torch nn.GELU)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),      # OpenAI CLIP
    "relu": jax.nn.relu,
}


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv bias init, U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _on_matrix_view(init: Initializer, num_in_dims: int) -> Initializer:
    """Runs a 2-D initialiser on the [prod(in dims), prod(out dims)] view of a packed kernel.

    Fan-in/fan-out then equal those of the PyTorch matrix (e.g. Xavier on the whole
    packed [3W, W] in-projection), whatever the stored layout.
    """

    def wrapped(key, shape, dtype=jnp.float32):
        matrix = (math.prod(shape[:num_in_dims]), math.prod(shape[num_in_dims:]))
        return init(key, matrix, dtype).reshape(shape)

    return wrapped


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(eps: float, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed and returned in float32 (scale 1, bias 0 init)."""
    return nn.LayerNorm(
        epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def dense(features: int, axes: tuple[str | None, str | None], *, kernel_init: Initializer,
          bias_init: Initializer | None, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    """``nn.Dense`` with logically partitioned kernel [in, out] and bias [out] (no bias if ``bias_init`` is None)."""
    return nn.Dense(
        features, use_bias=bias_init is not None, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init or nn.initializers.zeros, axes[1:]))


def projection(module: nn.Module, name: str, shape: tuple[int, int], param_dtype: Dtype) -> jax.Array:
    """A bias-free [in, embed_dim] projection matrix initialised N(0, in^-0.5), as CLIP / GRAIN do."""
    init = nn.initializers.normal(stddev=shape[0] ** -0.5)
    return module.param(name, nn.with_logical_partitioning(init, ("embed", None)), shape, param_dtype)


# Remat policies that keep named activations (``checkpoint_name`` in MultiHeadAttention), after
# MaxText's recipes of the same names. Between "none" and "full": the backward pass recomputes the
# rest of the block (LayerNorms, attention core, MLP) but not the projections kept here.
# Per token and layer they keep 3W ("save_qkv_proj") or 4W ("save_dot_except_mlp") compute-dtype values.
NAMED_REMAT_POLICIES = {
    "save_qkv_proj": ("qkv_proj",),
    "save_dot_except_mlp": ("qkv_proj", "out_proj"),
}


def _is_policy(fn: Callable) -> bool:
    """A checkpoint policy takes (prim, *avals, **params); other entries (save_only_these_names, ...) build one."""
    return next(iter(inspect.signature(fn).parameters), None) in ("prim", "_")


def remat(module_cls: type[nn.Module], policy: str | None, scanned: bool = False) -> type[nn.Module]:
    """Wraps a block class in ``nn.remat``.

    ``policy``: "none" (no remat), "full" (save nothing, recompute the block), a key of
    ``NAMED_REMAT_POLICIES``, or the name of any ``jax.checkpoint_policies`` entry (e.g.
    "dots_with_no_batch_dims_saveable": keep every weight matmul's output).
    ``scanned``: the block is the body of an ``nn.scan``, which already keeps XLA from merging the
    recomputation into the forward pass, so remat's own CSE barriers (``prevent_cse``) are dropped.
    """
    if policy in (None, "", "none"):
        return module_cls
    if policy == "full":
        return nn.remat(module_cls, prevent_cse=not scanned)
    if policy in NAMED_REMAT_POLICIES:
        fn = jax.checkpoint_policies.save_only_these_names(*NAMED_REMAT_POLICIES[policy])
    else:
        fn = getattr(jax.checkpoint_policies, policy, None)
        if fn is None or policy.startswith("_") or not _is_policy(fn):
            raise ValueError(f"unknown remat_policy {policy!r}: use 'none', 'full', one of "
                             f"{sorted(NAMED_REMAT_POLICIES)} or a jax.checkpoint_policies name")
    return nn.remat(module_cls, policy=fn, prevent_cse=not scanned)


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "explicit")


def attention_implementation(requested: str, dtype: Dtype) -> str:
    """The attention path for ``requested`` (one of ``ATTENTION_IMPLS``) and the compute dtype.

    "auto": "cudnn" on GPU in bf16/fp16 (cuDNN's flash attention takes no fp32), else "explicit".
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {requested!r}; choose from {ATTENTION_IMPLS}")
    if requested != "auto":
        return requested
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "explicit"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                          implementation: str) -> jax.Array:
    """q [..., Lq, H, Dh], k / v [..., Lk, H, Dh] (one dtype) -> [..., Lq, H, Dh], scale Dh^-0.5.

    Leading dims are flattened into the one batch dim ``jax.nn.dot_product_attention`` takes.
    A shape cuDNN rejects while tracing (e.g. a head dim it does not support) falls back to XLA.
    """
    lead = q.shape[:-3]
    q, k, v = (x.reshape((-1,) + x.shape[-3:]) for x in (q, k, v))
    impl = implementation
    if impl == "cudnn":
        try:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as e:
            logging.log_first_n(logging.WARNING, "cuDNN attention unavailable for q %s k %s (%s); using XLA's",
                                4, q.shape, k.shape, e)
            impl = "xla"
    if impl == "xla":
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    return out.reshape(lead + out.shape[1:])


@dataclasses.dataclass(frozen=True)
class BlockInit:
    """Initialisers of one transformer block's weights, each applied to PyTorch's 2-D [in, out] matrix.

    ``zero_attn_bias``: nn.MultiheadAttention zeroes its biases; timm's Linear-based attention keeps
    PyTorch's default U(+-1/sqrt(W)). MLP biases always use PyTorch's default.
    """
    qkv: Initializer = TORCH_DEFAULT_KERNEL
    out: Initializer = TORCH_DEFAULT_KERNEL
    fc1: Initializer = TORCH_DEFAULT_KERNEL
    fc2: Initializer = TORCH_DEFAULT_KERNEL
    zero_attn_bias: bool = False


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a packed q/k/v projection (PyTorch ``nn.MultiheadAttention`` numerics).

    q, k and v may come from different inputs (the decoder adds query positions to q and k
    only); all three use slices of one packed kernel. Optional per-head LayerNorm on q and k
    (timm ``qk_norm``), causal mask, and dropout on the attention probabilities.
    ``attention_impl``: see :func:`attention_implementation`; active dropout always takes the explicit path.
    """
    num_heads: int
    init: BlockInit = BlockInit()
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    causal: bool = False
    dropout_rate: float = 0.0
    deterministic: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
                 inputs_v: jax.Array | None = None) -> jax.Array:
        """inputs_q [..., Lq, W], inputs_k / inputs_v [..., Lk, W] (default: inputs_q) -> [..., Lq, W]."""
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        heads, head_dim = self.num_heads, width // self.num_heads
        bias_init = nn.initializers.zeros if self.init.zero_attn_bias else torch_default_bias(width)

        qkv_kernel = self.param(
            "qkv_kernel", nn.with_logical_partitioning(_on_matrix_view(self.init.qkv, 1), ("embed", None, "heads", "kv")),
            (width, 3, heads, head_dim), self.param_dtype)
        qkv_bias = self.param("qkv_bias", nn.with_logical_partitioning(bias_init, (None, "heads", "kv")),
                              (3, heads, head_dim), self.param_dtype)
        out_kernel = self.param(
            "out_kernel", nn.with_logical_partitioning(_on_matrix_view(self.init.out, 2), ("heads", "kv", "embed")),
            (heads, head_dim, width), self.param_dtype)
        out_bias = self.param("out_bias", nn.with_logical_partitioning(bias_init, ("norm",)), (width,),
                              self.param_dtype)

        def project(x, index):  # [..., L, W] -> [..., L, H, Dh]
            x, kernel, bias = promote_dtype(x, qkv_kernel[:, index], qkv_bias[index], dtype=self.dtype)
            return checkpoint_name(jnp.einsum("...lw,whd->...lhd", x, kernel) + bias, "qkv_proj")

        q, k, v = project(inputs_q, 0), project(inputs_k, 1), project(inputs_v, 2)
        if self.qk_norm:
            q = layer_norm(self.qk_norm_eps, self.param_dtype, name="q_norm")(q).astype(self.dtype)
            k = layer_norm(self.qk_norm_eps, self.param_dtype, name="k_norm")(k).astype(self.dtype)

        dropout = self.dropout_rate > 0 and not self.deterministic
        impl = "explicit" if dropout else attention_implementation(self.attention_impl, self.dtype)
        if impl == "explicit":
            logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
            logits = logits * head_dim ** -0.5
            if self.causal:
                # Position i attends to j <= i (OpenAI CLIP's additive -inf upper triangle).
                allowed = jnp.tril(jnp.ones((logits.shape[-2], logits.shape[-1]), dtype=bool))
                logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1)
            if dropout:
                probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
            probs, v = promote_dtype(probs, v, dtype=self.dtype)
            attended = jnp.einsum("...hqk,...khd->...qhd", probs, v)
        else:
            attended = dot_product_attention(q, k, v, causal=self.causal, implementation=impl)

        attended, out_kernel, out_bias = promote_dtype(attended, out_kernel, out_bias, dtype=self.dtype)
        return checkpoint_name(jnp.einsum("...qhd,hdw->...qw", attended, out_kernel) + out_bias, "out_proj")


class Mlp(nn.Module):
    """fc1 -> activation -> (dropout) -> fc2: [..., W] -> [..., W]."""
    hidden_dim: int
    activation: str = "gelu"
    init: BlockInit = BlockInit()
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden_dim, ("embed", "mlp"), kernel_init=self.init.fc1,
                  bias_init=torch_default_bias(width), name="fc1", **common)(x)
        h = nn.with_logical_constraint(activation_fn(self.activation)(h), ("batch", "seq", "mlp"))
        if self.dropout_rate > 0:
            h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
        return dense(width, ("mlp", "embed"), kernel_init=self.init.fc2,
                     bias_init=torch_default_bias(self.hidden_dim), name="fc2", **common)(h)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x += Attn(LN1(x)); x += MLP(LN2(x)). [B, L, W] f32 -> [B, L, W] f32."""
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-6
    qk_norm: bool = False
    causal: bool = False
    init: BlockInit = BlockInit()
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ACT_AXES)
        y = layer_norm(self.ln_eps, self.param_dtype, name="norm1")(x)
        x = x + MultiHeadAttention(self.num_heads, init=self.init, qk_norm=self.qk_norm, causal=self.causal,
                                   attention_impl=self.attention_impl, name="attn", **common)(y)
        y = layer_norm(self.ln_eps, self.param_dtype, name="norm2")(x)
        x = x + Mlp(self.mlp_dim, self.activation, init=self.init, name="mlp", **common)(y)
        return nn.with_logical_constraint(x.astype(jnp.float32), ACT_AXES)
