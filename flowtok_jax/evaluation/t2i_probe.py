"""`flowtok probe --direction t2i`: where a bundle's text-to-image fails, on captioned-shapes.

    flowtok probe --direction t2i --bundle runs/demo/bundle --data_dir runs/demo/data [--num 128]

T2I (SPEC §2) flows a sampled text latent z_T to image tokens and decodes them. Each measurement
is the pixel parser's accuracy on held-out (caption, image) pairs, so it reads like the T2I bar;
one JSON object:

  recon/accuracy
      decode(z_I), the encoder's tokens of the true image: the tokenizer's ceiling.
  noise/sigma=S/accuracy
      decode(z_I + S·std(z_I)·ε): how far off the data the decoder still draws the right scene. A
      decoder that fails at small S makes T2I fragile; one that holds leaves T2I to the flow.
  onestep/t=T/rel_err, onestep/t=T/accuracy
      the velocity at the TRUE point x_t of the straight path from z_T (a posterior sample of the
      caption) to z_I, extrapolated to t = 1 (x̂ = x_t + (1 − t)·v): squared error relative to
      z_I's variance, and the accuracy of decode(x̂). Near t = 0 the flow must lay out the scene
      from the caption alone; later x_t already holds part of it.
  ode/accuracy
      the sampler with the bundle's T2I defaults (what `flowtok generate` does), or --steps/--cfg.

Scales are those of the flow (tokens times the bundle's latent_scale).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax import flow_matching as fm
from flowtok_jax import inference
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import i2t_probe, shapes_eval

DEFAULT_TIMES = (0.0, 0.25, 0.5, 0.75, 0.9)
DEFAULT_SIGMAS = (0.1, 0.2, 0.4, 0.8)


def _programs(bundle: inference.Bundle):
  from flowtok_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  m = bundle.models

  @jax.jit
  def text(params, ids, key):
    feats, _, sample = i2t_probe.text_posterior(m, params, ids, key)
    return feats, sample

  @jax.jit
  def decode(params, z, feats):
    images = m.tokenizer.apply({"params": params["tokenizer"]}, z / m.latent_scale,
                               feats if m.text_aware else None, method=tok_lib.FlowTiTok.decode)
    return inference.to_uint8(images)

  @jax.jit
  def one_step(params, z_text, z_image, t):
    b = z_text.shape[0]
    tt = jnp.full((b,), t, jnp.float32)
    x_t = fm.interpolate(z_text, z_image, tt)
    direction = jnp.zeros((b,), jnp.int32) if m.two_directions else None
    v = inference.velocity_fn(m, params["flow"])(x_t, tt, jnp.zeros((b,), jnp.int32), direction)
    return x_t + (1.0 - t) * v

  image = jax.jit(functools.partial(inference.image_tokens, m))
  return text, decode, one_step, image


def probe(bundle, data_dir: str, *, split: str = "test", num: int = 128,
          times: Sequence[float] = DEFAULT_TIMES, sigmas: Sequence[float] = DEFAULT_SIGMAS,
          steps: Optional[int] = None, cfg_scale: Optional[float] = None,
          seed: int = 0) -> dict:
  """Runs the measurements of the module docstring on `num` examples of `split`.

  Returns:
    Flat dict of floats (keys as in the module docstring) plus 'num', 'steps', 'cfg_scale'.
  """
  b, images, attrs, captions = i2t_probe.probe_examples(bundle, data_dir, split, num)
  text, decode, one_step, image = _programs(b)
  params = jax.device_put(b.params)
  ids, _ = b.tokenizer.encode(list(captions), b.models.text_len)
  feats, z_text = text(params, jnp.asarray(ids), jax.random.PRNGKey(seed))
  z_image = image(params, jnp.asarray(images, jnp.float32) / 255.0)
  var = float(jnp.var(z_image))

  def accuracy(z) -> float:
    return float(shapes_eval.t2i_accuracy(np.asarray(decode(params, z, feats)), attrs)["accuracy"])

  out = {"num": len(images), "recon/accuracy": accuracy(z_image)}
  key = jax.random.PRNGKey(seed + 1)
  for s in sigmas:
    if not s >= 0:
      raise UserError(f"probe noise levels must be >= 0, got {s}")
    noise = jax.random.normal(key, z_image.shape) * float(s) * float(np.sqrt(var))
    out[f"noise/sigma={s:g}/accuracy"] = accuracy(z_image + noise)
  for t in times:
    if not 0.0 <= t < 1.0:
      raise UserError(f"probe times must be in [0, 1), got {t}")
    x1 = one_step(params, z_text, z_image, float(t))
    out[f"onestep/t={t:g}/rel_err"] = float(jnp.mean(jnp.square(x1 - z_image))) / max(var, 1e-12)
    out[f"onestep/t={t:g}/accuracy"] = accuracy(x1)
  knobs = b.defaults("t2i")
  steps = int(steps or knobs.get("steps", 20))
  cfg = float(cfg_scale if cfg_scale is not None else knobs.get("cfg_scale", 2.0))
  v = inference.velocity_fn(b.models, params["flow"])
  end = jax.jit(lambda z: fm.sample(
      v, z, steps=steps, cfg_scale=cfg, sampler=knobs.get("sampler", "euler"),
      grid=knobs.get("grid", "parity"), direction=0 if b.models.two_directions else None))(z_text)
  out["ode/accuracy"] = accuracy(end)
  out.update(steps=steps, cfg_scale=cfg)
  return out
