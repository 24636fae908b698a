"""The unified two-direction FlowTok loss (SPEC §3), shared by the `flowtok` stage and tests.

One function serves T2I, I2T and both at once: every example draws a direction, the text and
image tokens become its source and target accordingly, and ONE DiT forward covers the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax import flow_matching as fm
from flowtok_jax import losses
from flowtok_jax.models import flow as flow_lib
from flowtok_jax.models import text as text_lib
from flowtok_jax.models import tokenizer as tok_lib


# -- flowtok -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FlowTokLossConfig:
  """The scalars of the unified step (from `config.flowtok_stage` and `tokenizer.latent_scale`)."""
  p_i2t: float = 0.0
  null_prob: float = 0.1
  fm_weight: float = 1.0
  kl_weight: float = 0.01
  kl_reduction: str = "sum"
  align_weight: float = 1.0
  align_negatives: str = "global"
  dec_weight: float = 1.0
  image_sample: bool = True
  t_loc: float = 0.0
  t_scale: float = 1.0
  i2t_t_loc: Optional[float] = None
  i2t_target_mean: bool = False
  latent_scale: float = 1.0
  num_shards: int = 1
  pad_id: int = 0

  @property
  def two_way(self) -> bool:
    """Both directions are trained (a direction input exists)."""
    return self.p_i2t > 0


@dataclasses.dataclass(frozen=True)
class FlowTokModels:
  """The modules of the flowtok stage (trainable: flow, text_vae, align_mlp, text_decoder)."""
  flow: flow_lib.FlowTransformer
  text_vae: text_lib.TextVAE
  align_mlp: text_lib.AlignMLP
  text_decoder: Optional[text_lib.TextDecoder]
  clip_text: text_lib.CLIPTextTower
  image_encoder: tok_lib.FlowTiTokEncoder


def flow_pair(z_text: jax.Array, z_image: jax.Array, d: jax.Array,
              text_target: Optional[jax.Array] = None):
  """Source and target of each example's flow.

  Args:
    z_text: [B, L, C] sampled text tokens.
    z_image: [B, K, C] scaled image tokens.
    d: [B] direction, 0/False = T2I, 1/True = I2T.
    text_target: [B, L, C] what I2T flows to instead of z_text (`i2t_target_mean`: the text
      posterior mean); None: z_text, as SPEC §3.
  Returns:
    (source, target) [B, K, C]: T2I goes z_T → z_I; I2T goes z_I → stop_gradient(z_T), so the
    text VAE is never pulled towards whatever the flow finds easy to predict.
  """
  m = d.astype(bool)[:, None, None]
  to_text = jax.lax.stop_gradient(z_text if text_target is None else text_target)
  return jnp.where(m, z_image, z_text), jnp.where(m, to_text, z_image)


def _masked_mean(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _masked_var(x: jax.Array, w: jax.Array) -> jax.Array:
  """Variance over all elements of the examples with weight 1: x [B, ...], w [B]."""
  wb = w.reshape(w.shape + (1,) * (x.ndim - 1)) * jnp.ones_like(x)
  mu = _masked_mean(x, wb)
  return _masked_mean(jnp.square(x - mu), wb)


def flowtok_loss(models: FlowTokModels, lc: FlowTokLossConfig, params, frozen, batch,
                 rng: jax.Array, deterministic: bool = False):
  """The unified T2I + I2T loss of SPEC §3 (one DiT forward over the whole batch).

  Args:
    models: the modules.
    lc: loss scalars.
    params: {'flow', 'text_vae', 'align_mlp'[, 'text_decoder']}.
    frozen: {'clip_text', 'image_encoder'}.
    batch: 'text_ids' [B, L] and either 'image' [B, H, W, 3] or pre-tokenized posteriors
      'latent_mean', 'latent_logvar' [B, K, C] (unscaled); optionally 'i2t_text_ids' [B, L],
      the caption I2T examples use instead of 'text_ids'.
    rng: the step's key.
    deterministic: dropout off in the text VAE and text decoder (held-out evaluation, as the
      bundle runs them); the sampled tokens, times and directions still come from `rng`.
  Returns:
    (total loss, metrics).
  """
  b = batch["text_ids"].shape[0]
  k_t, k_zt, k_zi, k_drop, k_dir, k_null, k_dec = jax.random.split(rng, 7)
  if lc.two_way:
    d = jax.random.bernoulli(k_dir, lc.p_i2t, (b,)).astype(jnp.int32)
  else:
    d = jnp.zeros((b,), jnp.int32)
  ids = batch["text_ids"]
  if lc.two_way and "i2t_text_ids" in batch:
    # I2T examples learn the caption their image determines (data.i2t_caption_key): from its
    # deterministic image latent the ODE reaches the MEAN of the text latents it was trained
    # towards, and over several captions of one image that mean decodes to none of them.
    ids = jnp.where(d.astype(bool)[:, None], batch["i2t_text_ids"], ids)

  # 1. Text: frozen CLIP features -> text VAE posterior -> sampled z_T; KL; alignment.
  feats = jax.lax.stop_gradient(models.clip_text.apply({"params": frozen["clip_text"]}, ids))
  mean_t, logvar_t = models.text_vae.apply({"params": params["text_vae"]}, feats,
                                           deterministic=deterministic, rngs={"dropout": k_drop})
  z_text = mean_t + jnp.exp(0.5 * logvar_t) * jax.random.normal(k_zt, mean_t.shape)
  kl = losses.text_kl(mean_t, logvar_t, lc.kl_reduction, num_shards=lc.num_shards)
  aligned = models.align_mlp.apply({"params": params["align_mlp"]}, feats)
  tau = models.align_mlp.apply({"params": params["align_mlp"]},
                               method=text_lib.AlignMLP.logit_scale)
  align = losses.alignment_loss(z_text, aligned, tau, negatives=lc.align_negatives,
                                num_shards=lc.num_shards)

  # 2. Image: frozen tokenizer encoder (or stored posteriors) -> z_I · latent_scale.
  if "latent_mean" in batch:
    mean_i, logvar_i = batch["latent_mean"], batch["latent_logvar"]
  else:
    mean_i, logvar_i = models.image_encoder.apply({"params": frozen["image_encoder"]},
                                                  batch["image"])
  z_image = mean_i
  if lc.image_sample:
    z_image = mean_i + jnp.exp(0.5 * logvar_i) * jax.random.normal(k_zi, mean_i.shape)
  z_image = jax.lax.stop_gradient(z_image.astype(jnp.float32) * lc.latent_scale)

  # 3. Directions (drawn above), null roll (within each direction), one DiT forward.
  source, target = flow_pair(z_text, z_image, d, mean_t if lc.i2t_target_mean else None)
  target, null = fm.null_roll(k_null, target, p=lc.null_prob, num_shards=lc.num_shards,
                              groups=d if lc.two_way else None,
                              num_groups=2 if lc.two_way else 1)
  loc = lc.t_loc
  if lc.two_way and lc.i2t_t_loc is not None:
    loc = jnp.where(d.astype(bool), lc.i2t_t_loc, lc.t_loc)
  t = fm.sample_time(k_t, b, loc, lc.t_scale)
  v = models.flow.apply({"params": params["flow"]}, fm.interpolate(source, target, t), t, null,
                        d if lc.two_way else None)
  per_ex = fm.per_example_mse(v, fm.target_velocity(source, target))
  l_fm = per_ex.mean()

  w_t2i = (1 - d).astype(jnp.float32)
  metrics = {"loss_fm": l_fm, "kl": kl, "align": align, "logit_scale": tau,
             "null_frac": null.astype(jnp.float32).mean(),
             "text_std": jnp.std(z_text), "image_std": jnp.std(z_image)}
  # Only the directions this run draws: a T2I loss of 0.0 from a run that never draws T2I
  # (p_i2t 1, I2T only) would read as a perfect one.
  directions = ([("t2i", w_t2i)] if not lc.two_way or lc.p_i2t < 1.0 else []) + (
      [("i2t", 1.0 - w_t2i)] if lc.two_way else [])
  for name, w in directions:
    loss_dir = _masked_mean(per_ex, w)
    metrics[f"loss_{name}"] = loss_dir
    # A small loss can hide latents that carry little: compare with the target's own variance.
    metrics[f"rel_loss_{name}"] = loss_dir / jnp.maximum(_masked_var(target, w), 1e-12)
  if lc.two_way:
    metrics["frac_i2t"] = d.astype(jnp.float32).mean()

  total = lc.fm_weight * l_fm + lc.kl_weight * kl + lc.align_weight * align
  # 4. Text decoder: read z_T back into ids (pad positions do not count).
  if models.text_decoder is not None:
    logits = models.text_decoder.apply({"params": params["text_decoder"]}, z_text,
                                       deterministic=deterministic, rngs={"dropout": k_dec})
    mask = ids != lc.pad_id
    dec = losses.masked_token_ce(logits, ids, mask)
    total = total + lc.dec_weight * dec
    metrics["dec_ce"] = dec
    metrics["dec_acc"] = losses.masked_token_accuracy(logits, ids, mask)
  return total, metrics


def estimate_latent_scale(encode: Optional[Callable[[jax.Array], tuple[jax.Array, jax.Array]]],
                          batches: Iterable[dict], *, sample: bool = True,
                          seed: int = 0) -> float:
  """1 / std of the image latents the flow would see (SPEC §1.1: the demo's `latent_scale`).

  Args:
    encode: images [B, H, W, 3] -> (mean, logvar) [B, K, C] (e.g. a jitted FlowTiTok.encode);
      unused (may be None) for batches of stored posteriors.
    batches: batches with 'image', or with pre-tokenized 'latent_mean' / 'latent_logvar'
      (global arrays are fine: the reduction runs under jit).
    sample: measure posterior samples (what training uses) rather than means.
    seed: key of the posterior noise.
  Returns:
    The scale as a Python float (std over every element of every batch, in float64).
  """
  @jax.jit
  def moments(batch, key):
    if "latent_mean" in batch:
      mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
      mean, logvar = encode(batch["image"])
    z = mean
    if sample:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    z = z.astype(jnp.float32)
    return jnp.sum(z), jnp.sum(jnp.square(z)), z.size

  total = total_sq = count = 0.0
  for i, batch in enumerate(batches):
    keys = ("latent_mean", "latent_logvar") if "latent_mean" in batch else ("image",)
    s, sq, n = jax.device_get(moments({k: batch[k] for k in keys}, jax.random.PRNGKey(seed + i)))
    total, total_sq, count = total + float(s), total_sq + float(sq), count + float(n)
  if not count:
    raise ValueError("estimate_latent_scale needs at least one batch")
  var = max(total_sq / count - (total / count) ** 2, 0.0)
  return float(1.0 / max(np.sqrt(var), 1e-12))
