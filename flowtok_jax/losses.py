"""Losses of every stage: KL forms, contrastive alignment / CLIP, reconstruction, GAN, token CE.

All functions are pure jnp, computed in float32, and return scalars unless stated. Batch-wide
reductions are written over the full (global) batch: under `jit` with the batch sharded over the
data axes, XLA inserts the cross-device reductions, so "global" needs no explicit collective. The
`local` options reproduce per-device behaviour of the reference by splitting the batch into its
`num_shards` contiguous per-shard blocks (the layout of a batch sharded over the data axes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flowtok_jax.errors import UserError

KL_REDUCTIONS = ("sum", "mean")
NEGATIVES = ("local", "global")
RECON_KINDS = ("l2", "l1")


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


# -- KL --------------------------------------------------------------------------------------------

def text_kl(mean: jax.Array, logvar: jax.Array, reduction: str = "sum",
            num_shards: int = 1) -> jax.Array:
  """The text VAE's KL term in the reference form -0.5·Σ(1 + logvar - (0.3·μ)⁶ - exp(logvar)).

  The μ-penalty is (0.3·μ)⁶ rather than μ² (the reference's "naive KLD"): it barely acts for
  |μ| < 3 and then grows fast, so the text latents may carry information in their means.

  Args:
    mean: [B, L, C] posterior means.
    logvar: [B, L, C] posterior log-variances.
    reduction: 'sum' (parity with the released code, whose weight 0.01 assumes it) or 'mean'
      per element (batch-size independent).
    num_shards: for 'sum': the reference sums over each device's local batch and then averages
      gradients over devices, i.e. it optimises Σ_global / num_devices; the global sum is
      divided by this to match (1 = the plain sum over the whole batch).
  Returns:
    scalar KL.
  """
  if reduction not in KL_REDUCTIONS:
    raise UserError(f"unknown KL reduction {reduction!r} (choose from {', '.join(KL_REDUCTIONS)})")
  mean, logvar = _f32(mean), _f32(logvar)
  terms = 1.0 + logvar - (0.3 * mean) ** 6 - jnp.exp(logvar)
  return -0.5 * (terms.sum() / num_shards if reduction == "sum" else terms.mean())


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(μ, σ²) ‖ N(0, 1)) = 0.5·Σ(μ² + σ² - 1 - log σ²), summed per example, mean over batch.

  Args:
    mean: [B, ...] posterior means (e.g. the tokenizer's [B, K, C]).
    logvar: [B, ...] posterior log-variances.
  Returns:
    scalar: the batch mean of each example's KL summed over its token and channel axes.
  """
  mean, logvar = _f32(mean), _f32(logvar)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(axis=1).mean()


# -- contrastive -----------------------------------------------------------------------------------

def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  # The clamp matches torch's F.normalize: an all-zero row stays zero instead of becoming NaN.
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _symmetric_infonce(a: jax.Array, b: jax.Array, log_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE on one block: a, b [n, D] already normalised; labels arange(n)."""
  logits = jnp.exp(_f32(log_scale)) * (a @ b.T)
  labels = jnp.arange(a.shape[0])
  ab = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  ba = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return 0.5 * (ab + ba)


def contrastive_loss(a: jax.Array, b: jax.Array, log_scale: jax.Array, *,
                     negatives: str = "global", num_shards: int = 1) -> jax.Array:
  """Symmetric contrastive (InfoNCE) loss between paired rows of `a` and `b`.

  Each example is flattened to one vector and L2-normalised; logits = exp(log_scale)·â·b̂ᵀ; the
  loss is the mean of the a→b and b→a cross-entropies with labels arange(B).

  Args:
    a: [B, ...] e.g. sampled text tokens z_T [B, L, C] or image embeddings [B, D].
    b: [B, ...] the paired side, same per-example size as `a`.
    log_scale: scalar logit scale τ (learnable; the logits use exp(τ)).
    negatives: 'global' uses every other example of the (global) batch as a negative; 'local'
      uses only the examples of the same data shard (the reference's per-GPU negatives) and
      averages the per-shard losses.
    num_shards: number of data shards of the batch axis (used by 'local'; must divide B).
  Returns:
    scalar loss.
  """
  if negatives not in NEGATIVES:
    raise UserError(f"unknown contrastive negatives {negatives!r} "
                    f"(choose from {', '.join(NEGATIVES)})")
  bsz = a.shape[0]
  a = _l2_normalize(_f32(a).reshape(bsz, -1))
  b = _l2_normalize(_f32(b).reshape(bsz, -1))
  if negatives == "global" or num_shards == 1:
    return _symmetric_infonce(a, b, log_scale)
  if bsz % num_shards:
    raise UserError(f"batch of {bsz} examples does not split into {num_shards} data shards")
  a = a.reshape(num_shards, bsz // num_shards, -1)
  b = b.reshape(num_shards, bsz // num_shards, -1)
  per_shard = jax.vmap(_symmetric_infonce, in_axes=(0, 0, None))(a, b, log_scale)
  return per_shard.mean()


def alignment_loss(z_text: jax.Array, aligned: jax.Array, log_scale: jax.Array, *,
                   negatives: str = "global", num_shards: int = 1) -> jax.Array:
  """The text-token alignment loss (SPEC §1.2): sampled z_T [B, L, C] vs AlignMLP(F) [B, L, C]."""
  return contrastive_loss(z_text, aligned, log_scale, negatives=negatives, num_shards=num_shards)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, log_scale: jax.Array, *,
              negatives: str = "global", num_shards: int = 1) -> jax.Array:
  """CLIP pretraining loss: image [B, D] vs text [B, D] embeddings, same math as the alignment."""
  return contrastive_loss(image_emb, text_emb, log_scale, negatives=negatives,
                          num_shards=num_shards)


def contrastive_accuracy(a: jax.Array, b: jax.Array) -> jax.Array:
  """Fraction of rows of `a` whose most similar row of `b` is its own pair (a→b retrieval)."""
  bsz = a.shape[0]
  a = _l2_normalize(_f32(a).reshape(bsz, -1))
  b = _l2_normalize(_f32(b).reshape(bsz, -1))
  return jnp.mean(jnp.argmax(a @ b.T, axis=1) == jnp.arange(bsz))


# -- reconstruction and GAN ------------------------------------------------------------------------

def reconstruction_loss(pred: jax.Array, target: jax.Array, kind: str = "l2",
                        weights: jax.Array | None = None) -> jax.Array:
  """Mean squared ('l2') or absolute ('l1') error over every element. pred/target [B, ...].

  `weights` (broadcast against them, e.g. [B, H, W, 1]): the weighted mean instead.
  """
  if kind not in RECON_KINDS:
    raise UserError(f"unknown reconstruction loss {kind!r} (choose from {', '.join(RECON_KINDS)})")
  diff = _f32(pred) - _f32(target)
  err = jnp.square(diff) if kind == "l2" else jnp.abs(diff)
  if weights is None:
    return jnp.mean(err)
  w = jnp.broadcast_to(_f32(weights), err.shape)
  return jnp.sum(w * err) / jnp.maximum(jnp.sum(w), 1e-12)


def object_weights(images: jax.Array, weight: float, dilate: int,
                   threshold: float = 0.1) -> jax.Array:
  """[B, H, W, 3] images in [0, 1] -> [B, H, W, 1] pixel weights: `weight` on and within `dilate`
  pixels of a pixel brighter than `threshold` (an object on a dark background), 1 elsewhere.

  The dilation reaches the background inside an object's box, where a disc and a square differ.
  """
  fg = (jnp.max(_f32(images), axis=-1, keepdims=True) > threshold).astype(jnp.float32)
  if dilate > 0:  # A k × k max as a k × 1 then a 1 × k max: the same mask, ~12x cheaper on CPU.
    k = 2 * dilate + 1
    fg = jax.lax.reduce_window(fg, 0.0, jax.lax.max, (1, k, 1, 1), (1, 1, 1, 1), "SAME")
    fg = jax.lax.reduce_window(fg, 0.0, jax.lax.max, (1, 1, k, 1), (1, 1, 1, 1), "SAME")
  return 1.0 + (weight - 1.0) * fg  # From the target images: no gradient flows here.


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """PatchGAN hinge loss of the discriminator: 0.5·(E[relu(1 - D(x))] + E[relu(1 + D(x̂))])."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator side of the hinge GAN: -E[D(x̂)]."""
  return -jnp.mean(_f32(logits_fake))


def lecam_loss(logits_real: jax.Array, logits_fake: jax.Array, ema_real: jax.Array,
               ema_fake: jax.Array) -> jax.Array:
  """LeCam regulariser of the discriminator (Tseng et al. 2021).

  E[relu(D(x) - ema_fake)²] + E[relu(ema_real - D(x̂))²], with `ema_*` running means of the
  discriminator's mean outputs on real and fake images (see `lecam_ema_update`).
  """
  return (jnp.mean(jnp.square(jax.nn.relu(_f32(logits_real) - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - _f32(logits_fake)))))


def lecam_ema_update(ema_real: jax.Array, ema_fake: jax.Array, logits_real: jax.Array,
                     logits_fake: jax.Array, decay: float = 0.999) -> tuple[jax.Array, jax.Array]:
  """One EMA step of the LeCam anchors: ema = decay·ema + (1 - decay)·mean(D(·))."""
  new_real = decay * ema_real + (1.0 - decay) * jnp.mean(_f32(logits_real))
  new_fake = decay * ema_fake + (1.0 - decay) * jnp.mean(_f32(logits_fake))
  return new_real, new_fake


# -- text decoder ----------------------------------------------------------------------------------

def masked_token_ce(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Token cross-entropy averaged over the positions where `mask` is true.

  Args:
    logits: [B, L, V] decoder logits.
    ids: [B, L] int target ids.
    mask: [B, L] bool/0-1, true where the position counts (not padding).
  Returns:
    scalar mean CE over counted positions (0 when none count).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(_f32(logits), ids)
  w = _f32(mask)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_token_accuracy(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of counted positions whose argmax equals the id."""
  w = _f32(mask)
  hit = _f32(jnp.argmax(logits, axis=-1) == ids)
  return jnp.sum(hit * w) / jnp.maximum(jnp.sum(w), 1.0)
