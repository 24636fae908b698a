"""Shared layers: logical-axis rules, dense helpers, attention with 2D RoPE, MLPs, norms, tables.

Every parameter is created with logical axis names (`dense`, `Embed`, `with_axes`), so the
sharding module can map it onto the mesh with `DEFAULT_LOGICAL_RULES` (or the config's rules).
Parameters are always float32; `dtype` on each module is the compute dtype.

PyTorch weights map as: Linear weight [out, in] -> kernel = weight.T (reshaped to the kernel's
multi-dim shape, e.g. [W, 3, H, Dh] for fused qkv, [H, Dh, W] for the output projection);
Conv2d weight [out, in, kh, kw] -> kernel = weight.permute(2, 3, 1, 0) (NHWC); LayerNorm
weight/bias -> scale/bias.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.errors import UserError

Dtype = Any
Initializer = Callable[..., jax.Array]

# Logical axis -> mesh axis, in priority order (flax assigns each mesh axis at most once per array,
# so an activation [batch, length, embed] gets batch on ('data', 'fsdp') and embed unsharded).
DEFAULT_LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),  # Examples split over every data-parallel device.
    ("length", None),  # Sequences are short (77 tokens, <= 1178 in the tokenizer): never split.
    ("embed", "fsdp"),  # Model dim of parameters: ZeRO-3 style sharding over fsdp.
    ("heads", "tensor"),  # Attention heads: Megatron-style tensor parallelism.
    ("kv", None),  # Per-head dim: kept whole.
    ("mlp", "tensor"),  # MLP hidden / fused projection outputs: tensor parallelism.
    ("vocab", "tensor"),  # Embedding tables and logits over the vocabulary.
)

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Bias init marker for `Dense`: PyTorch's default Linear bias, U(±1/√fan_in), which needs the
# kernel's fan-in (an initializer of the bias alone only sees the output shape).
TORCH_DEFAULT_BIAS = "torch_default_bias"


def _torch_bias(fan_in: int) -> Initializer:
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def normal(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


def trunc_normal(std: float) -> Initializer:
  """The reference's `torch.nn.init.trunc_normal_(w, std=std)`.

  Its default bounds (-2, 2) are absolute values, not multiples of std, so at the small stds the
  models use (0.02: ±100σ) it is N(0, std²). Flax's `truncated_normal` cuts at ±2σ instead and
  gives std 0.88·std.
  """
  if std > 0.1:
    raise ValueError(f"trunc_normal({std}): bounds ±2 would cut the distribution")
  return nn.initializers.normal(stddev=std)


def with_axes(init: Initializer, axes: Sequence[Optional[str]]) -> Initializer:
  """Wraps an initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_dot(x: jax.Array, kernel: jax.Array, in_dims: int,
              grad_from_input: bool = True) -> jax.Array:
  """x [..., *in] · kernel [*in, *out] -> [..., *out]: `jax.lax.dot_general`, with its own VJP.

  The value and both gradients are the plain dot's; only the operand order of the kernel's
  gradient differs. JAX's own rule contracts (g, x), so XLA's CPU backend transposes g, the
  output's cotangent, to put the contracted rows last, and fuses that transpose into the chain
  of elementwise ops producing g (a residual stream's LayerNorm backward and adds): every
  element of a dozen inputs read with a stride. Contracting (x, g) transposes x, one stored
  array, instead. On the demo's tokenizer step that fusion took ~1/5 of the op time
  (docs/benchmarks.md, "seventeenth pass"). Other backends see the same two dots.
  """
  contract = tuple(range(x.ndim - in_dims, x.ndim))
  return jax.lax.dot_general(x, kernel, ((contract, tuple(range(in_dims))), ((), ())))


def _dense_dot_fwd(x, kernel, in_dims, grad_from_input):
  return dense_dot(x, kernel, in_dims, grad_from_input), (x, kernel)


def _dense_dot_bwd(in_dims, grad_from_input, res, g):
  x, kernel = res
  lead = tuple(range(x.ndim - in_dims))  # Batch-like dims of x and of g.
  gx = jax.lax.dot_general(  # g [..., *out] · kernel [*in, *out] over out -> [..., *in].
      g, kernel, ((tuple(range(len(lead), g.ndim)), tuple(range(in_dims, kernel.ndim))),
                  ((), ())))
  if grad_from_input:
    gk = jax.lax.dot_general(x, g, ((lead, lead), ((), ())))  # -> [*in, *out].
  else:  # g first: [*out, *in], then the kernel's order.
    gk = jax.lax.dot_general(g, x, ((lead, lead), ((), ())))
    n_out = g.ndim - len(lead)
    gk = gk.transpose(tuple(range(n_out, gk.ndim)) + tuple(range(n_out)))
  return gx.astype(x.dtype), gk.astype(kernel.dtype)


dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


class Dense(nn.Module):
  """y = x · kernel + bias, contracting the last `in_dims` axes of x; kernel [*in, *features].

  Unlike nn.DenseGeneral, the kernel is created (and logically annotated) at its full shape, so
  the logical sharding constraint applies to the real array; `kernel_init` still sees the
  flattened [fan_in, fan_out] shape, so xavier / fan-in scaling match a PyTorch Linear.
  """
  features: tuple[int, ...]
  axes: tuple[Optional[str], ...]  # Logical names of the kernel dims.
  in_dims: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = xavier_uniform
  bias_init: Initializer | str = zeros  # Or TORCH_DEFAULT_BIAS.
  grad_from_input: bool = True  # `dense_dot`'s operand order for the kernel's gradient.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_dims:]
    fan_in, fan_out = int(np.prod(in_shape)), int(np.prod(self.features))

    def init(key, shape, dtype=jnp.float32):
      return self.kernel_init(key, (fan_in, fan_out), dtype).reshape(shape)

    kernel = self.param("kernel", with_axes(init, self.axes), in_shape + self.features,
                        jnp.float32)
    y = dense_dot(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims,
                  self.grad_from_input)
    if self.use_bias:
      bias_init = (_torch_bias(fan_in) if self.bias_init == TORCH_DEFAULT_BIAS
                   else self.bias_init)
      bias = self.param("bias", with_axes(bias_init, self.axes[self.in_dims:]),
                        self.features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """Lookup table [num, features] (parameter 'embedding', as nn.Embed names it).

  The table is stored split along its feature dim (FSDP) and gathered whole right before the
  lookup, as FSDP does for every weight: a lookup into a split table otherwise makes XLA's
  partitioner replicate the result ("involuntary full rematerialization").
  """
  num: int
  features: int
  dtype: Dtype = jnp.float32
  init: Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.param("embedding", with_axes(self.init, (None, "embed")),
                       (self.num, self.features), jnp.float32)
    table = constrain(table, (None, None))
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class PatchEmbed(nn.Module):
  """images [B, H, W, Cin] -> [B, H/p, W/p, features]: a stride-p, p x p, VALID convolution.

  Parameters as nn.Conv names them (kernel [p, p, Cin, features], bias [features]), so a
  PyTorch Conv2d maps as weight.permute(2, 3, 1, 0). Computed as non-overlapping patches times
  the flattened kernel: XLA's CPU convolution ran this at ~1/6 of its matmul rate (the FlowTok
  stage's frozen encoder: 5.7 ms a step for 0.1 GFLOP; docs/benchmarks.md, "seventeenth pass").
  """
  features: int
  patch_size: int
  axes: tuple[Optional[str], ...] = (None, None, None, "embed")  # Logical kernel dims.
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = xavier_uniform
  bias_init: Initializer = zeros

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image {h}x{w} is not a whole number of {p}x{p} patches")
    kernel = self.param("kernel", with_axes(self.kernel_init, self.axes),
                        (p, p, c, self.features), jnp.float32)
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    # The kernel's gradient transposes the cotangent [B·N, features], smaller than the patches
    # [B·N, p·p·Cin] (the tokenizer's op time outside matmuls: 75 -> 68 ms per step).
    y = dense_dot(x.astype(self.dtype), kernel.astype(self.dtype), 3, False)
    if self.use_bias:
      bias = self.param("bias", with_axes(self.bias_init, self.axes[-1:]), (self.features,),
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes: Sequence[Optional[str]], *, name: str, dtype: Dtype = jnp.float32,
          kernel_init: Initializer = xavier_uniform, bias_init: Initializer | str = zeros,
          use_bias: bool = True, in_dims: int = 1, grad_from_input: bool = True) -> Dense:
  """A `Dense` with logical names on the kernel (and on the bias: the output dims).

  Args:
    features: int or tuple of output dims.
    axes: logical names of the whole kernel (contracted dims first, then output dims).
    name: parameter scope name.
    dtype: compute dtype (parameters stay float32).
    kernel_init: unboxed initializer; applied to the flattened [fan_in, fan_out] kernel.
    bias_init: unboxed initializer for the bias, or TORCH_DEFAULT_BIAS.
    use_bias: add a bias.
    in_dims: number of trailing input axes contracted.
    grad_from_input: False where x is costlier to recompute than the output's cotangent
      (see `dense_dot`).
  """
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  if len(axes) != in_dims + len(features):
    raise ValueError(f"{name}: {len(axes)} axis names for a kernel of rank "
                     f"{in_dims + len(features)}")
  return Dense(features, tuple(axes), in_dims=in_dims, use_bias=use_bias, dtype=dtype,
               kernel_init=kernel_init, bias_init=bias_init, grad_from_input=grad_from_input,
               name=name)


def layer_norm(name: str, *, eps: float = 1e-5, affine: bool = True,
               dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  # Two-pass variance (E[(x - mean)²], as PyTorch): the fast E[x²] − mean² form loses digits
  # on large-mean activations, which would break weight-import parity.
  return nn.LayerNorm(epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype,
                      param_dtype=jnp.float32, name=name, use_fast_variance=False,
                      scale_init=with_axes(nn.initializers.ones_init(), ("embed",)),
                      bias_init=with_axes(zeros, ("embed",)))


class ParityLayerNorm(nn.Module):
  """g·(x − mean)/(std + eps) + b with the unbiased std: the text VAE's own LayerNorm.

  Kept because the released text-VAE weights were trained with it (eps on std, ddof=1).
  """
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", with_axes(nn.initializers.ones_init(), ("embed",)), (d,))
    bias = self.param("bias", with_axes(zeros, ("embed",)), (d,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum(jnp.square(x32 - mean), axis=-1, keepdims=True) / (d - 1))
    y = scale * (x32 - mean) / (std + self.eps) + bias
    return y.astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Fixed tables (numpy, float32): no parameters.


def bilinear_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """[out, in] float64 weights of torch's `interpolate(mode='bilinear', align_corners=False)`
  along one axis (half-pixel centres).

  Output i is centred on source coordinate c = (i + 0.5) · in / out. Without antialiasing it
  mixes the two nearest pixels, 1 - frac and frac, at s = c - 0.5 (clamped to the image). With
  it (`antialias=True`; the same as without when enlarging), a shrink by r = in / out widens the
  triangle filter to r pixels: pixel j gets max(0, 1 - |j + 0.5 - c| / r) over j in
  [int(c - r + 0.5), int(c + r + 0.5)) within the image, normalised to sum to 1 (torch's
  `_compute_indices_min_size_weights_aa`).
  """
  scale = in_size / out_size
  centre = (np.arange(out_size) + 0.5) * scale
  m = np.zeros((out_size, in_size), np.float64)
  if antialias and scale > 1.0:
    for i, c in enumerate(centre):
      lo, hi = max(int(c - scale + 0.5), 0), min(int(c + scale + 0.5), in_size)
      j = np.arange(lo, hi)
      w = np.maximum(0.0, 1.0 - np.abs(j + 0.5 - c) / scale)
      m[i, lo:hi] = w / w.sum()
    return m
  s = np.maximum(centre - 0.5, 0.0)
  lo = np.minimum(np.floor(s).astype(np.int64), in_size - 1)
  frac = s - lo
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), np.minimum(lo + 1, in_size - 1)), frac)
  return m


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of t, ordered [cos | sin] (DiT); t is used raw (no ×1000).

  Args:
    t: [B] times (fractional).
    dim: embedding size (even).
    max_period: lowest frequency is 1/max_period.
  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_1d(dim: int, length: int) -> np.ndarray:
  """Fixed MAE-style 1D position table, ordered [sin | cos], ω_i = 1/10000^(i/(dim/2)).

  Returns:
    [length, dim] float32.
  """
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.arange(length, dtype=np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def rope_2d(head_dim: int, grid: int, num_extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """EVA-style 2D rotary tables for a grid of patches, padded for tokens without RoPE.

  Head dims [0, head_dim/2) rotate with the row index, [head_dim/2, head_dim) with the column;
  each frequency is repeated for the two members of an adjacent pair. The `num_extra` rows
  after the grid² patch rows are (cos=1, sin=0): those tokens (latents, text) pass unchanged,
  which saves slicing q/k into patch and non-patch parts.

  Returns:
    (cos, sin), each [grid² + num_extra, head_dim] float32, patches in row-major order.
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
  dim = head_dim // 2
  freqs = 1.0 / 10000 ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  ang = np.arange(grid, dtype=np.float64)[:, None] * freqs[None]  # [g, dim/2]
  ang = np.repeat(ang, 2, axis=-1)  # [g, dim]: pairs share a frequency
  rows = np.broadcast_to(ang[:, None, :], (grid, grid, dim))
  cols = np.broadcast_to(ang[None, :, :], (grid, grid, dim))
  ang = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, head_dim)
  cos = np.concatenate([np.cos(ang), np.ones((num_extra, head_dim))], axis=0)
  sin = np.concatenate([np.sin(ang), np.zeros((num_extra, head_dim))], axis=0)
  return cos.astype(np.float32), sin.astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x·cos + rot(x)·sin with rot rotating adjacent pairs: (x0, x1) -> (−x1, x0).

  Args:
    x: [B, N, H, Dh].
    cos, sin: [N, Dh].
  """
  pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rot * sin


# ---------------------------------------------------------------------------------------------
# Attention and MLPs.


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r} (known: {', '.join(sorted(ACTIVATIONS))})")
  return ACTIVATIONS[name]


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection.

  Parameters: qkv/kernel [W, 3, H, Dh], qkv/bias [3, H, Dh], proj/kernel [H, Dh, W], proj/bias [W].
  (A PyTorch Linear(W, 3W) weight maps as weight.T.reshape(W, 3, H, Dh).)
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  dropout: float = 0.0  # On the attention probabilities.
  kernel_init: Initializer = xavier_uniform
  proj_init: Optional[Initializer] = None  # Defaults to kernel_init.
  bias_init: Initializer | str = zeros  # Both projections' biases (or TORCH_DEFAULT_BIAS).

  @nn.compact
  def __call__(self, x: jax.Array, rope: Optional[tuple[jax.Array, jax.Array]] = None,
               deterministic: bool = True) -> jax.Array:
    """x [B, N, W] -> [B, N, W]; `rope` = (cos, sin) [N, Dh] applied to q and k."""
    b, n, w = x.shape
    if w % self.num_heads:
      raise ValueError(f"width {w} is not divisible by {self.num_heads} heads")
    hd = w // self.num_heads
    qkv = dense((3, self.num_heads, hd), ("embed", None, "heads", "kv"), name="qkv",
                dtype=self.dtype, kernel_init=self.kernel_init, bias_init=self.bias_init)(x)
    qkv = constrain(qkv, ("batch", "length", None, "heads", "kv"))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh]
    if rope is not None:
      q = apply_rope(q, *rope)
      k = apply_rope(k, *rope)
    q = q * jnp.asarray(hd ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if self.causal:
      mask = np.tril(np.ones((n, n), dtype=bool))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if self.dropout > 0 and not deterministic:
      probs = nn.Dropout(self.dropout)(probs, deterministic=False)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    return dense(w, ("heads", "kv", "embed"), name="proj", dtype=self.dtype, in_dims=2,
                 kernel_init=self.proj_init or self.kernel_init, bias_init=self.bias_init)(out)


class Mlp(nn.Module):
  """fc1 [W, hidden] -> activation -> fc2 [hidden, W]."""
  hidden: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = xavier_uniform
  dropout: float = 0.0  # After the activation (the text VAE's FFN).
  bias_init: Initializer | str = zeros  # Or TORCH_DEFAULT_BIAS.

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    w = x.shape[-1]
    h = dense(self.hidden, ("embed", "mlp"), name="fc1", dtype=self.dtype,
              kernel_init=self.kernel_init, bias_init=self.bias_init)(x)
    h = constrain(activation(self.act)(h), ("batch", "length", "mlp"))
    if self.dropout > 0 and not deterministic:
      h = nn.Dropout(self.dropout)(h, deterministic=False)
    # fc2's kernel gradient transposes its cotangent after an exact (erf) GELU: XLA recomputes
    # the activation inside the transpose, and erf costs more than the residual's chain
    # (the CLIP image tower's step: 0.23 s the other way, 0.20 s this way).
    return dense(w, ("mlp", "embed"), name="fc2", dtype=self.dtype,
                 kernel_init=self.kernel_init, bias_init=self.bias_init,
                 grad_from_input=self.act != "gelu")(h)


class SwiGLU(nn.Module):
  """w3(silu(x1) · x2) with [x1, x2] = w12(x); biases on both projections.

  Parameters: w12/kernel [W, 2, hidden] (x1 = index 0), w12/bias [2, hidden], w3 [hidden, W].
  (A PyTorch Linear(W, 2h) weight maps as weight.T.reshape(W, 2, h).)
  """
  hidden: int
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = x.shape[-1]
    h12 = dense((2, self.hidden), ("embed", None, "mlp"), name="w12", dtype=self.dtype,
                kernel_init=self.kernel_init)(x)
    h = nn.silu(h12[..., 0, :]) * h12[..., 1, :]
    h = constrain(h, ("batch", "length", "mlp"))
    return dense(w, ("mlp", "embed"), name="w3", dtype=self.dtype,
                 kernel_init=self.kernel_init)(h)


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
  """int(2/3 · ratio·W): 2048 for W = 768, 2730 for W = 1024 (the released shapes)."""
  return int(2 / 3 * int(width * mlp_ratio))


class PreLNBlock(nn.Module):
  """x + Attn(LN(x)), then x + MLP(LN(x)): the tokenizer and CLIP block.

  `mlp` is 'swiglu' (hidden int(2/3·ratio·W)) or an activation name for a plain 2-layer MLP.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  mlp: str = "gelu"
  causal: bool = False
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = xavier_uniform

  @nn.compact
  def __call__(self, x: jax.Array, rope=None) -> jax.Array:
    w = x.shape[-1]
    h = layer_norm("ln_1", eps=self.ln_eps, dtype=self.dtype)(x)
    x = x + Attention(self.num_heads, dtype=self.dtype, causal=self.causal,
                      kernel_init=self.kernel_init, name="attn")(h, rope=rope)
    h = layer_norm("ln_2", eps=self.ln_eps, dtype=self.dtype)(x)
    if self.mlp == "swiglu":
      h = SwiGLU(swiglu_hidden(w, self.mlp_ratio), dtype=self.dtype,
                 kernel_init=self.kernel_init, name="mlp")(h)
    else:
      h = Mlp(int(w * self.mlp_ratio), act=self.mlp, dtype=self.dtype,
              kernel_init=self.kernel_init, name="mlp")(h)
    return constrain(x + h, ("batch", "length", "embed"))


def dtype_of(name: str) -> Dtype:
  """'float32' | 'bfloat16' -> jnp dtype."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise UserError(f"model_dtype must be one of {', '.join(table)}, got {name!r}")
  return table[name]
