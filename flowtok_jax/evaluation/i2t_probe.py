"""`flowtok probe`: where a two-way bundle's image-to-text fails, measured on captioned-shapes.

    flowtok probe --bundle runs/demo/bundle --data_dir runs/demo/data [--split test] [--num 128]

I2T (SPEC §4) starts its ODE at the image's deterministic latent z_I, so it can end no closer to
the words than three things allow; the probe measures each on held-out images, against the
caption I2T was trained to write (the reference caption when the run set
`data.i2t_caption_key`, else the dataset caption), and prints one JSON object:

  text/mean_exact, text/sample_exact
      the text VAE + decoder round trip alone: decode(posterior mean) and decode(a posterior
      sample) of the target captions, parsed and scored like I2T. The I2T ceiling.
  text/blend_exact
      decode(the mean of the posterior means of `blend_captions` captions per scene, drawn as
      the dataset draws them: paraphrases, either object first). Where an ideal deterministic
      I2T ODE ends when trained on every caption of an image (`data.i2t_caption_key` unset).
  onestep/t=T/rel_err, onestep/t=T/exact
      the velocity at the TRUE point x_t of the straight path from z_I to the target's
      posterior mean, extrapolated to t = 1 (x̂ = x_t + (1 − t)·v): its squared error relative
      to the targets' variance, and how often x̂ decodes to the right caption. Near t = 0 the
      network must map image to text; for t > 0 x_t already holds part of the target, and a
      network that only learned to read it off is accurate there and useless at t = 0.
  ode/rel_err, ode/exact
      the ODE's endpoint with the bundle's I2T sampler defaults (what `flowtok caption` does).
"""
from __future__ import annotations

from typing import Optional, Sequence

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax import flow_matching as fm
from flowtok_jax import inference
from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import caption_metrics, shapes_eval

DEFAULT_TIMES = (0.0, 0.1, 0.25, 0.5, 0.75)


def target_captions(bundle: inference.Bundle, attrs: Sequence[dict],
                    captions: Sequence[str]) -> list[str]:
  """The captions I2T was trained towards: reference captions if the run asked for them."""
  key = bundle.config.data.get("i2t_caption_key")
  if not key:
    return list(captions)
  if key != "reference_caption":
    raise UserError(f"the probe knows captioned_shapes' reference_caption, not data."
                    f"i2t_caption_key={key!r}")
  return [shapes.reference_caption(a["objects"], a["relation"]) for a in attrs]


def text_posterior(models: inference.Models, params, ids: jax.Array, key: jax.Array):
  """Prompt ids [B, L] -> (CLIP features [B, L, D], text-VAE mean, a posterior sample [B, L, C])."""
  feats = models.clip_text.apply({"params": params["clip_text"]}, ids)
  mean, logvar = models.text_vae.apply({"params": params["text_vae"]}, feats)
  return feats, mean, mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)


def _programs(bundle: inference.Bundle):
  m = bundle.models

  @jax.jit
  def text(params, ids, key):
    return text_posterior(m, params, ids, key)[1:]

  @jax.jit
  def one_step(params, z_image, z_text, t):
    tt = jnp.full((z_image.shape[0],), t, jnp.float32)
    x_t = fm.interpolate(z_image, z_text, tt)
    b = z_image.shape[0]
    v = inference.velocity_fn(m, params["flow"])(x_t, tt, jnp.zeros((b,), jnp.int32),
                                                 jnp.ones((b,), jnp.int32))
    return x_t + (1.0 - t) * v

  image = jax.jit(functools.partial(inference.image_tokens, m))
  decode = jax.jit(functools.partial(inference.text_ids, m))
  return text, image, decode, one_step


def _blend_means(bundle, text, params, attrs, num_captions: int, seed: int):
  """Per scene, the mean of the text VAE's posterior means over `num_captions` captions drawn
  as the dataset draws them (paraphrases; for two objects either object first)."""
  p = bundle.config.data.shapes.get("paraphrase_prob", 0.3)
  rng = np.random.default_rng(seed)
  out = []
  for a in attrs:
    objects, relation = a["objects"], a["relation"]
    caps = [shapes.random_caption(rng, objects[::-1], shapes.INVERSE_RELATION[relation], p)
            if relation and j % 2 else shapes.random_caption(rng, objects, relation, p)
            for j in range(num_captions)]
    ids, _ = bundle.tokenizer.encode(caps, bundle.models.text_len)
    out.append(text(params, jnp.asarray(ids), jax.random.PRNGKey(0))[0].mean(axis=0))
  return jnp.stack(out)


def probe_examples(bundle, data_dir: str, split: str, num: int, *, captions: bool = False):
  """(bundle, images, attrs, captions) of the first `num` examples of a held-out `split`: what
  every `flowtok probe` reads. One-line UserErrors for --num < 1, the training split, an empty
  split and (`captions`) a bundle without the image-to-text direction."""
  if num < 1:
    raise UserError(f"--num must be at least 1, got {num}")
  b = inference.as_bundle(bundle)
  if captions and not b.can_caption:
    raise UserError(f"bundle {b.path} has no image-to-text direction to probe")
  split = shapes_eval.held_out_split(split, "the probe")
  images, attrs, texts = shapes_eval.load_split(b.config.data, data_dir, split, num)
  if not len(images):
    raise UserError(f"split {split!r} is empty")
  return b, images, attrs, texts


def probe(bundle, data_dir: str, *, split: str = "test", num: int = 128,
          times: Sequence[float] = DEFAULT_TIMES, steps: Optional[int] = None,
          cfg_scale: Optional[float] = None, seed: int = 0, blend_captions: int = 32) -> dict:
  """Runs the three measurements (module docstring) on `num` examples of `split`.

  Returns:
    Flat dict of floats (keys as in the module docstring) plus 'num', 'steps', 'cfg_scale';
    `blend_captions` = 0 skips text/blend_exact.
  """
  b, images, attrs, captions = probe_examples(bundle, data_dir, split, num, captions=True)
  targets = target_captions(b, attrs, captions)
  ids, _ = b.tokenizer.encode(targets, b.models.text_len)
  text, image, decode, one_step = _programs(b)
  params = jax.device_put(b.params)
  mean, sample = text(params, jnp.asarray(ids), jax.random.PRNGKey(seed))
  z_image = image(params, jnp.asarray(images, jnp.float32) / 255.0)
  var = float(jnp.var(mean))

  def score(z) -> tuple[float, float]:
    rel = float(jnp.mean(jnp.square(z - mean))) / max(var, 1e-12)
    words = b.tokenizer.decode(np.asarray(decode(params, z)))
    return rel, caption_metrics.caption_accuracy(words, attrs)["exact"]

  out = {"num": len(images), "text/mean_exact": score(mean)[1],
         "text/sample_exact": score(sample)[1]}
  if blend_captions:
    out["text/blend_exact"] = score(_blend_means(b, text, params, attrs, blend_captions,
                                                 seed))[1]
  for t in times:
    if not 0.0 <= t < 1.0:
      raise UserError(f"probe times must be in [0, 1), got {t}")
    out[f"onestep/t={t:g}/rel_err"], out[f"onestep/t={t:g}/exact"] = score(
        one_step(params, z_image, mean, float(t)))
  knobs = b.defaults("i2t")
  steps = int(steps or knobs.get("steps", 20))
  cfg = float(cfg_scale if cfg_scale is not None else knobs.get("cfg_scale", 1.0))
  v = inference.velocity_fn(b.models, params["flow"])
  end = jax.jit(lambda z: fm.sample(v, z, steps=steps, cfg_scale=cfg,
                                    sampler=knobs.get("sampler", "euler"),
                                    grid=knobs.get("grid", "parity"), direction=1))(z_image)
  out["ode/rel_err"], out["ode/exact"] = score(end)
  out.update(steps=steps, cfg_scale=cfg)
  return out
