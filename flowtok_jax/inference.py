"""Serving FlowTok from an export bundle: `Generator` (text -> image), `Captioner` (image -> text).

    gen = Generator("runs/demo/bundle")
    images = gen.generate(["a red circle in the center"], seeds=[0])      # uint8 [1, S, S, 3]
    cap = Captioner("runs/demo/bundle")
    cap.caption_images([images[0]])                                        # ['a red circle ...']

A bundle (written by `export.py`, read by `load_bundle` here) is a directory:

    bundle.json           format version, latent scale, capabilities, sampler defaults, checksums
    config.json           the flowtok stage's config (models are rebuilt from it)
    params.msgpack        {clip_text, text_vae, align_mlp, flow[, text_decoder], tokenizer/{encoder,
                          decoder}} (flax msgpack, float32 or bfloat16)
    text_tokenizer.model  the sentencepiece model
    t2i.jaxexport, i2t.jaxexport   optional `jax.export` programs (symbolic batch) that run
                          without this package: `jax.export.deserialize(data).call(params, ...)`

Both directions are pure functions of (params, inputs) whose whole ODE is one compiled program
(`text_to_image`, `image_to_text`); the classes load the bundle once, pad requests to a fixed
batch so each knob setting compiles once, and serve any number of inputs. Randomness enters
only through per-image seeds (the text-VAE sample of z_T), so a (prompt, seed) pair gives the
same image in any batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowtok_jax import flow_matching as fm
from flowtok_jax import paths
from flowtok_jax import progress
from flowtok_jax.errors import UserError

FORMAT_NAME = "flowtok_bundle"
FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
CONFIG_JSON = "config.json"
PARAMS_FILE = "params.msgpack"
TOKENIZER_FILE = "text_tokenizer.model"
PROGRAM_FILES = {"t2i": "t2i.jaxexport", "i2t": "i2t.jaxexport"}
# The PRNG behind the per-image seeds, pinned so that a different default (e.g. RBG keys set by a
# test session or a user's JAX flags) cannot change which image a seed gives.
SEED_PRNG = "threefry2x32"
# Images below this many pixels per side carry too little to caption (a 1x1 "image" is an error).
MIN_IMAGE_SIDE = 8


# -- models and pure pipelines --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Models:
  """The modules of a bundle (stateless Flax modules; parameters travel separately).

  Attributes:
    clip_text, text_vae, flow, tokenizer, text_decoder: the modules (text_decoder None when the
      run trained none).
    two_directions: the DiT takes a direction input (0 = T2I, 1 = I2T).
    text_aware: the tokenizer decoder reads the prompt's CLIP features.
    latent_scale: the flow works on tokenizer latents times this.
    text_len: L (= K image tokens).
    image_size: S, pixels per side.
  """
  clip_text: Any
  text_vae: Any
  flow: Any
  tokenizer: Any
  text_decoder: Any
  two_directions: bool
  text_aware: bool
  latent_scale: float
  text_len: int
  image_size: int


def build_models(config: ml_collections.ConfigDict, latent_scale: float) -> Models:
  """Rebuilds the inference modules from a flowtok-stage config (as the stage builder does)."""
  from flowtok_jax.models import flow as flow_lib  # pylint: disable=g-import-not-at-top
  from flowtok_jax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  from flowtok_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  dtype = config.get("model_dtype", "float32")
  fc = flow_lib.FlowConfig.from_config(config.flow, dtype=dtype)
  tc = tok_lib.TokenizerConfig.from_config(config.tokenizer, dtype=dtype)
  decoder = None
  if config.get("text_decoder") is not None:
    decoder = text_lib.TextDecoder(
        text_lib.TextDecoderConfig.from_config(config.text_decoder, dtype=dtype))
  return Models(
      clip_text=text_lib.CLIPTextTower(text_lib.CLIPTextConfig.from_config(config.clip_text,
                                                                           dtype=dtype)),
      text_vae=text_lib.TextVAE(text_lib.TextVAEConfig.from_config(config.text_vae, dtype=dtype)),
      flow=flow_lib.FlowTransformer(fc), tokenizer=tok_lib.FlowTiTok(tc), text_decoder=decoder,
      two_directions=fc.two_directions, text_aware=tc.text_aware,
      latent_scale=float(latent_scale), text_len=int(config.clip_text.max_len),
      image_size=tc.image_size)


def seed_noise(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[B] uint32 seeds -> [B, *shape] standard normal noise, each row a function of its seed only."""
  def one(seed):
    return jax.random.normal(jax.random.key(seed, impl=SEED_PRNG), shape, jnp.float32)
  return jax.vmap(one)(seeds.astype(jnp.uint32))


def velocity_fn(models: Models, flow_params):
  """(x, t, null, direction) -> the DiT's velocity with `flow_params` bound."""
  def v(x, t, null, direction):
    return models.flow.apply({"params": flow_params}, x, t, null, direction)
  return v


def to_uint8(images: jax.Array) -> jax.Array:
  """[B, S, S, 3] float (about [0, 1]) -> uint8, clipped and rounded."""
  return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def text_to_image(models: Models, params, ids: jax.Array, seeds: jax.Array, cfg_scale, *,
                  steps: int, sampler: str, grid: str) -> jax.Array:
  """Text-to-image: prompt ids -> CLIP -> text VAE sample z_T -> ODE (direction 0) -> decoder.

  Args:
    models: from `build_models`.
    params: the bundle's parameter tree.
    ids: [B, L] int32 prompt ids (EOS, then pad).
    seeds: [B] uint32, one per image: the noise of the z_T sample.
    cfg_scale: guidance scale (Python float: 1.0 skips the null pass; or a traced scalar).
    steps, sampler, grid: see `flow_matching.sample`.
  Returns:
    uint8 [B, S, S, 3] images.
  """
  from flowtok_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  feats = models.clip_text.apply({"params": params["clip_text"]}, ids)
  mean, logvar = models.text_vae.apply({"params": params["text_vae"]}, feats)
  # SPEC §1: z_T is sampled at inference too, not the posterior mean.
  z_text = mean + jnp.exp(0.5 * logvar) * seed_noise(seeds, mean.shape[1:])
  z_image = fm.sample(velocity_fn(models, params["flow"]), z_text, steps=steps,
                      cfg_scale=cfg_scale, sampler=sampler, grid=grid,
                      direction=0 if models.two_directions else None)
  images = models.tokenizer.apply({"params": params["tokenizer"]},
                                  z_image / models.latent_scale,
                                  feats if models.text_aware else None,
                                  method=tok_lib.FlowTiTok.decode)
  return to_uint8(images)


def image_to_text(models: Models, params, images: jax.Array, cfg_scale, *, steps: int,
                  sampler: str, grid: str) -> jax.Array:
  """Image-to-text (SPEC §4): encoder mean · scale -> ODE (direction 1) -> text decoder -> argmax.

  Args:
    models: from `build_models` (two-direction, with a text decoder).
    params: the bundle's parameter tree.
    images: [B, S, S, 3] float32 in [0, 1].
    cfg_scale, steps, sampler, grid: see `flow_matching.sample`.
  Returns:
    [B, L] int32 token ids (argmax per position; the caller cuts at EOS).
  """
  z_text = fm.sample(velocity_fn(models, params["flow"]), image_tokens(models, params, images),
                     steps=steps, cfg_scale=cfg_scale, sampler=sampler, grid=grid, direction=1)
  return text_ids(models, params, z_text)


def image_tokens(models: Models, params, images: jax.Array) -> jax.Array:
  """[B, S, S, 3] float32 in [0, 1] -> the I2T source: encoder posterior mean · latent_scale."""
  from flowtok_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  mean, _ = models.tokenizer.apply({"params": params["tokenizer"]}, images,
                                   method=tok_lib.FlowTiTok.encode)
  return mean * models.latent_scale


def text_ids(models: Models, params, z_text: jax.Array) -> jax.Array:
  """Text tokens [B, L, C] -> [B, L] int32 ids, argmax per position (the caller cuts at EOS)."""
  logits = models.text_decoder.apply({"params": params["text_decoder"]}, z_text)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# -- bundles --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Bundle:
  """A loaded export bundle.

  Attributes:
    path: its directory.
    meta: bundle.json.
    config: the flowtok stage's config.
    params: the parameter tree (numpy arrays).
    tokenizer: the `TextTokenizer`.
    models: the modules, rebuilt from the config.
  """
  path: str
  meta: dict
  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  models: Models

  @property
  def can_caption(self) -> bool:
    return bool(self.meta.get("capabilities", {}).get("i2t"))

  def defaults(self, direction: str) -> dict:
    """Sampler defaults recorded at export ('t2i' or 'i2t')."""
    return dict(self.meta.get("defaults", {}).get(direction, {}))


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{what} is missing ({path})") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{what} is unreadable ({path}): {e}") from None
  if not isinstance(value, dict):
    raise UserError(f"{what} is not a JSON object ({path})")
  return value


def check_params(models: Models, params, i2t: bool) -> None:
  """Traces (no compile) the serving pipelines on `params`: a parameter tree that does not fit
  the modules (a missing or misshapen leaf) is a UserError, not a traceback at first use."""
  import flax.errors  # pylint: disable=g-import-not-at-top
  try:
    jax.eval_shape(lambda p: text_to_image(
        models, p, jnp.zeros((1, models.text_len), jnp.int32), jnp.zeros((1,), jnp.uint32), 2.0,
        steps=1, sampler="euler", grid="parity"), params)
    if i2t:
      s = models.image_size
      jax.eval_shape(lambda p: image_to_text(
          models, p, jnp.zeros((1, s, s, 3)), 1.0, steps=1, sampler="euler", grid="parity"),
                     params)
  except (flax.errors.FlaxError, KeyError, TypeError, ValueError) as e:
    raise UserError(f"the parameters do not fit the config: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None


def read_bundle_meta(path: str) -> dict:
  """bundle.json of the bundle at `path`, with its format checked (UserError if not a bundle)."""
  path = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.isdir(path):
    raise UserError(f"no bundle at {path}" + (" (it is a file, not a bundle directory)"
                                              if os.path.exists(path) else ""))
  meta_path = os.path.join(path, BUNDLE_JSON)
  if not os.path.exists(meta_path):
    raise UserError(f"{path} is not a flowtok bundle (no {BUNDLE_JSON}; make one with "
                    "`flowtok export`)")
  meta = _read_json(meta_path, f"bundle {path}: {BUNDLE_JSON}")
  if meta.get("format") != FORMAT_NAME:
    raise UserError(f"{path} is not a flowtok bundle ({BUNDLE_JSON} has format "
                    f"{meta.get('format')!r})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise UserError(f"bundle {path} has format version {meta.get('format_version')}; this "
                    f"flowtok reads version {FORMAT_VERSION} (re-export it)")
  if not isinstance(meta.get("files", {}), dict):
    raise UserError(f"bundle {path} is corrupt: {BUNDLE_JSON} 'files' is not a mapping")
  return meta


def check_file(path: str, meta: dict, name: str):
  """UserError unless bundle file `name` exists and matches its bundle.json checksum."""
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise UserError(f"bundle {path} is incomplete: {name} is missing")
  want = meta.get("files", {}).get(name)
  if want and file_sha256(file) != want:
    raise UserError(f"bundle {path} is corrupt: {name} does not match its checksum "
                    "(re-export it)")


def load_bundle(path: str) -> Bundle:
  """Reads and checks a bundle; anything missing, corrupt or mismatched is one UserError line."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  path = paths.local(str(path), "--bundle")
  meta = read_bundle_meta(path)
  for name in (CONFIG_JSON, PARAMS_FILE, TOKENIZER_FILE):
    check_file(path, meta, name)
  config = ml_collections.ConfigDict(_read_json(os.path.join(path, CONFIG_JSON),
                                                f"bundle {path}: {CONFIG_JSON}"))
  params_path = os.path.join(path, PARAMS_FILE)
  try:
    with open(params_path, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"bundle {path} is corrupt: {PARAMS_FILE} does not parse "
                    f"({type(e).__name__})") from None
  tok = text_tokenizer.load(os.path.join(path, TOKENIZER_FILE))
  try:
    models = build_models(config, meta["latent_scale"])
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    raise UserError(f"bundle {path}: config.json or bundle.json lacks a needed entry or has a "
                    f"bad value ({type(e).__name__}: {e})") from None
  missing = [k for k in ("clip_text", "text_vae", "flow", "tokenizer")
             if not isinstance(params, dict) or k not in params]
  if missing:
    raise UserError(f"bundle {path} is corrupt: parameters lack {', '.join(missing)}")
  try:
    check_params(models, params, i2t=models.text_decoder is not None and "text_decoder" in params)
  except UserError as e:
    raise UserError(f"bundle {path}: {e}") from None
  return Bundle(path=path, meta=meta, config=config, params=params, tokenizer=tok, models=models)


def as_bundle(bundle) -> Bundle:
  return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def load_program(bundle, direction: str, compiler_options: Optional[dict] = None):
  """The bundle's exported `jax.export` program for 't2i' or 'i2t', with its params bound.

  Returns:
    t2i: `fn(ids [B, L] int32, seeds [B] uint32, cfg_scale f32) -> uint8 [B, S, S, 3]`;
    i2t: `fn(images [B, S, S, 3] f32 in [0, 1], cfg_scale f32) -> int32 ids [B, L]`.
    Steps, sampler and grid are fixed at export (`bundle.meta['programs'][direction]`).
    `compiler_options` go to the XLA compile of the deserialised program.
  """
  b = as_bundle(bundle)
  info = b.meta.get("programs", {}).get(direction)
  if not info:
    raise UserError(f"bundle {b.path} has no exported {direction} program (export with "
                    "--programs)")
  check_file(b.path, b.meta, PROGRAM_FILES[direction])
  path = os.path.join(b.path, PROGRAM_FILES[direction])
  try:
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"bundle {b.path}: the {direction} program does not load "
                    f"({type(e).__name__})") from None
  params = jax.device_put(b.params)
  run = jax.jit(exported.call, compiler_options=compiler_options)

  def call(*args):
    return run(params, *args)
  return call


# -- input checks ---------------------------------------------------------------------------------

def encode_prompts(tokenizer, prompts: Sequence[str], text_len: int,
                   truncate: bool = False) -> np.ndarray:
  """Prompts -> ids [N, L]; empty prompts are UserErrors, and so are over-long ones unless
  `truncate` (then they keep their first L - 1 tokens and EOS, as in training)."""
  if not prompts:
    raise UserError("no prompt given")
  for p in prompts:
    if not isinstance(p, str) or not p.strip():
      raise UserError("empty prompt: give some text to draw")
  ids, truncated = tokenizer.encode(list(prompts), max_len=text_len)
  for p, cut in zip(prompts, truncated):
    if cut and not truncate:
      full, _ = tokenizer.encode([p], max_len=max(4 * text_len, len(p) + 2))
      n = int(np.argmax(full[0] == tokenizer.eos_id))
      specials = int(tokenizer.bos_id == full[0, 0]) + 1  # Start token (CLIP), end token.
      shown = p if len(p) <= 60 else p[:57] + "..."
      raise UserError(f"prompt is too long: {shown!r} is {n + 1 - specials} tokens, this model "
                      f"reads at most {text_len - specials} (text length L = {text_len} "
                      "including its special tokens)")
  # What is left of each prompt once its unknown pieces are dropped (empty: nothing known).
  unk = tokenizer.unk_id  # None: byte-level BPE, nothing is unknown.
  known = tokenizer.decode(ids if unk is None else np.where(ids == unk, tokenizer.pad_id, ids))
  for p, rest in zip(prompts, known):
    if not rest.strip():
      raise UserError(f"prompt {p!r} has nothing the text tokenizer knows (every token is "
                      "unknown): nothing to condition on")
  unknown = [p for p, row in zip(prompts, ids) if unk is not None and unk in row]
  if unknown:
    logging.warning("parts of %r are unknown to the text tokenizer (read as <unk>)", unknown[0])
  return ids


def load_image(path: str, image_size: int) -> np.ndarray:
  """Reads an image file -> uint8 [S, S, 3] (shorter side resized to S, centre crop).

  Raises:
    UserError: missing or unreadable file, not an image, or smaller than MIN_IMAGE_SIDE.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data.examples import pil_to_rgb_uint8  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise UserError(f"cannot read image {path}: no such file")
  if os.path.isdir(path):
    raise UserError(f"cannot read image {path}: it is a directory")
  try:
    with Image.open(path) as img:
      img.load()
      array = pil_to_rgb_uint8(img)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UserError(f"cannot read image {path}: not a readable image file "
                    f"({type(e).__name__})") from None
  return prepare_image(array, image_size, name=path)


def prepare_image(image: np.ndarray, image_size: int, name: str = "image") -> np.ndarray:
  """uint8 [H, W, 3] (or [H, W], [H, W, 4]) -> uint8 [S, S, 3] by resize + centre crop."""
  from flowtok_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise UserError(f"{name}: expected uint8 pixels, got {arr.dtype}")
  if arr.ndim == 2:
    arr = np.stack([arr] * 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
    raise UserError(f"{name}: expected an RGB image [H, W, 3], got shape {arr.shape}")
  h, w = arr.shape[:2]
  if min(h, w) < MIN_IMAGE_SIDE:
    raise UserError(f"{name} is {w}x{h} pixels: too small to caption (at least "
                    f"{MIN_IMAGE_SIDE} px per side; the model sees {image_size}x{image_size})")
  return pipeline.resize_center_crop(np.ascontiguousarray(arr[..., :3]), image_size)


# Guidance scales in use are 1-10; far beyond, v_c + s·(v_c − v_u) overflows float32 (at ~1e30
# the samples are NaN, which decode to black images and empty captions without an error).
MAX_CFG_SCALE = 100.0


def check_knobs(steps: int, cfg_scale: float, sampler: str, grid: Optional[str]) -> str:
  """The time grid for these sampler knobs (default by sampler); UserError on a bad knob."""
  if sampler not in fm.SAMPLERS:
    raise UserError(f"unknown sampler {sampler!r} (choose from {', '.join(fm.SAMPLERS)})")
  grid = grid or ("parity" if sampler == "euler" else "uniform")
  if grid not in fm.GRIDS:
    raise UserError(f"unknown time grid {grid!r} (choose from {', '.join(fm.GRIDS)})")
  if sampler == "heun" and grid != "uniform":
    raise UserError("the heun sampler runs on the uniform grid (--grid uniform)")
  if int(steps) < 1:
    raise UserError(f"--steps must be at least 1, got {steps}")
  if not math.isfinite(float(cfg_scale)) or not 0.0 <= float(cfg_scale) <= MAX_CFG_SCALE:
    raise UserError(f"the guidance scale must be in [0, {MAX_CFG_SCALE:g}] (0: unconditional, "
                    f"1: no guidance), got {cfg_scale}")
  return grid


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """Pads the leading axis to `size` by repeating the last row (one compile per batch size)."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


# -- serving --------------------------------------------------------------------------------------

# XLA options of servers made without explicit ones (tests lower the optimisation level here).
DEFAULT_COMPILER_OPTIONS: dict = {}
# (config.json checksum, latent scale, direction, knobs, compiler options) -> jitted pipeline.
# Servers of equal bundles share compiled programs: parameters are arguments, not constants.
_JITTED: dict[tuple, Any] = {}


class _Server:
  """Loads a bundle once and keeps one jitted program per knob setting."""

  direction = ""

  def __init__(self, bundle, *, batch_size: int = 8, steps: Optional[int] = None,
               cfg_scale: Optional[float] = None, sampler: Optional[str] = None,
               grid: Optional[str] = None, compiler_options: Optional[dict] = None):
    self.bundle = as_bundle(bundle)
    self.compiler_options = dict(DEFAULT_COMPILER_OPTIONS if compiler_options is None
                                 else compiler_options)
    if int(batch_size) < 1:
      raise UserError(f"batch size must be at least 1, got {batch_size}")
    self.batch_size = int(batch_size)
    d = self.bundle.defaults(self.direction)
    try:  # The bundle's own defaults, checked as such: the user passed no flag for them.
      check_knobs(d.get("steps", 20), d.get("cfg_scale", 1.0), d.get("sampler", "euler"),
                  d.get("grid"))
    except (UserError, TypeError, ValueError) as e:
      raise UserError(f"bundle {self.bundle.path}: its {BUNDLE_JSON} 'defaults.{self.direction}' "
                      f"are invalid ({e}); re-export it") from None
    self.steps = int(steps if steps is not None else d.get("steps", 20))
    self.cfg_scale = float(cfg_scale if cfg_scale is not None else d.get("cfg_scale", 1.0))
    self.sampler = sampler or d.get("sampler", "euler")
    self.grid = check_knobs(self.steps, self.cfg_scale, self.sampler,
                             grid or (d.get("grid") if self.sampler == d.get("sampler") else None))
    self.params = jax.device_put(self.bundle.params)
    self._programs = {}
    # Called with the number of examples after each compiled call (e.g. a progress bar's
    # `update`); None: nothing.
    self.progress: Optional[Callable[[int], Any]] = None

  def _done(self, n: int):
    if self.progress is not None:
      self.progress(n)

  def knobs(self) -> dict:
    return {"steps": self.steps, "cfg_scale": self.cfg_scale, "sampler": self.sampler,
            "grid": self.grid}

  def _program(self, fn):
    key = (self.bundle.meta.get("files", {}).get(CONFIG_JSON), self.bundle.models.latent_scale,
           fn.__name__, self.steps, self.cfg_scale, self.sampler, self.grid,
           tuple(sorted(self.compiler_options.items())))
    if key[0] is None:  # No checksum to tell configs apart: keep the program to this server.
      key = (id(self),) + key
    if key not in _JITTED:
      models, steps, cfg, sampler, grid = (self.bundle.models, self.steps, self.cfg_scale,
                                           self.sampler, self.grid)
      _JITTED[key] = jax.jit(
          lambda params, *x: fn(models, params, *x, cfg, steps=steps, sampler=sampler,
                                grid=grid), compiler_options=self.compiler_options or None)
    return _JITTED[key]


class Generator(_Server):
  """Text-to-image from a bundle.

  Args:
    bundle: a bundle directory or a loaded `Bundle`.
    batch_size: images per compiled call (requests are chunked and the last chunk padded).
    steps, cfg_scale, sampler, grid: sampler knobs; None takes the bundle's defaults (20 Euler
      steps on the parity grid, CFG 2.0).
    compiler_options: XLA options of the compile (e.g. a lower optimisation level in tests).
  """

  direction = "t2i"

  def generate(self, prompts: Sequence[str], seeds: Sequence[int],
               truncate: bool = False) -> np.ndarray:
    """One image per (prompt, seed) pair.

    Args:
      prompts: N prompts (repeat a prompt for several images).
      seeds: N seeds in [0, 2^32); the same (prompt, seed) gives the same image.
      truncate: cut over-long prompts to L tokens instead of refusing them.
    Returns:
      uint8 [N, S, S, 3].
    """
    if len(prompts) != len(seeds):
      raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    seeds = [int(s) for s in seeds]
    if any(not 0 <= s < 2 ** 32 for s in seeds):
      raise UserError("seeds must be in [0, 2^32)")
    ids = encode_prompts(self.bundle.tokenizer, list(prompts), self.bundle.models.text_len,
                         truncate)
    seeds = np.asarray(seeds, np.uint32)
    run = self._program(text_to_image)
    out = []
    for a, b in _chunks(len(ids), self.batch_size):
      images = run(self.params, pad_rows(ids[a:b], self.batch_size),
                   pad_rows(seeds[a:b], self.batch_size))
      out.append(np.asarray(jax.device_get(images))[: b - a])
      self._done(b - a)
    return np.concatenate(out)


class Captioner(_Server):
  """Image-to-text from a bundle (needs a model trained in both directions with a text decoder).

  Args:
    bundle: a bundle directory or a loaded `Bundle`.
    batch_size, steps, cfg_scale, sampler, grid: as for `Generator` (default CFG 1.0: none).
  """

  direction = "i2t"

  def __init__(self, bundle, **kwargs):
    b = as_bundle(bundle)
    if not b.can_caption:
      why = b.meta.get("capabilities", {}).get("i2t_missing") or "it was trained text-to-image only"
      raise UserError(f"bundle {b.path} cannot caption images: {why}")
    super().__init__(b, **kwargs)

  def caption_images(self, images: Sequence[np.ndarray]) -> list[str]:
    """Captions uint8 images of any size (each resized / centre-cropped to the model's size)."""
    size = self.bundle.models.image_size
    prepared = np.stack([prepare_image(im, size, name=f"image {i}")
                         for i, im in enumerate(images)]) if len(images) else None
    return self._caption(prepared)

  def caption_files(self, paths: Sequence[str]) -> list[str]:
    """Captions image files; any unreadable or too small file is a UserError before any work."""
    size = self.bundle.models.image_size
    prepared = np.stack([load_image(p, size) for p in paths]) if paths else None
    return self._caption(prepared)

  def _caption(self, images: Optional[np.ndarray]) -> list[str]:
    if images is None:
      raise UserError("no image given")
    x = images.astype(np.float32) * np.float32(1 / 255)
    run = self._program(image_to_text)
    ids = []
    for a, b in _chunks(len(x), self.batch_size):
      out = run(self.params, pad_rows(x[a:b], self.batch_size))
      ids.append(np.asarray(jax.device_get(out))[: b - a])
      self._done(b - a)
    return list(self.bundle.tokenizer.decode(np.concatenate(ids)))


# -- command-line entry points (one call each from cli.py) ----------------------------------------

def generate_to_dir(bundle, prompts: Sequence[str], out: str, *, num: int = 1, seed: int = 0,
                    batch_size: int = 8, **knobs) -> list[dict]:
  """`flowtok generate`: `num` images per prompt -> `out/NNNN.png` + `out/samples.json`.

  Image j (prompt-major order) uses seed `seed + j`; `samples.json` lists, per image, its file,
  prompt, seed and the sampler knobs, so any single image can be regenerated alone.

  Args:
    bundle: bundle directory (or loaded `Bundle`).
    prompts: the prompts.
    out: output directory (created).
    num: images per prompt.
    seed: seed of the first image.
    batch_size: images per compiled call.
    **knobs: steps, cfg_scale, sampler, grid (None: the bundle's defaults).
  Returns:
    The samples.json records.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if int(num) < 1:
    raise UserError(f"--num must be at least 1, got {num}")
  out = paths.writable_dir(out, "--out")
  if os.path.isfile(os.path.join(out, BUNDLE_JSON)):  # Images inside a bundle: a slip.
    raise UserError(f"--out {out} is a bundle; write the images elsewhere (e.g. {out}-samples)")
  all_prompts = [p for p in prompts for _ in range(int(num))]
  seeds = [int(seed) + j for j in range(len(all_prompts))]
  if int(seed) < 0 or seeds and seeds[-1] >= 2 ** 32:
    raise UserError(f"--seed must be in [0, 2^32 - {len(seeds)}], got {seed}")
  names = [f"{j:04d}.png" for j in range(len(all_prompts))]
  previous = _listed_samples(out) if os.path.isdir(out) else set()
  foreign = [n for n in names if os.path.exists(os.path.join(out, n)) and n not in previous]
  if foreign:  # Files this command did not write are the user's: never overwrite them.
    raise UserError(f"--out {out} already holds {foreign[0]}, which no earlier `flowtok "
                    "generate` wrote there (its samples.json does not list it); choose another "
                    "--out or move the file")
  gen = Generator(bundle, batch_size=batch_size, **knobs)
  with progress_on(len(all_prompts), "generate", gen):
    images = gen.generate(all_prompts, seeds)
  os.makedirs(out, exist_ok=True)
  records = []
  for name, prompt, s, image in zip(names, all_prompts, seeds, images):
    Image.fromarray(image).save(os.path.join(out, name))
    records.append({"file": name, "prompt": prompt, "seed": s, **gen.knobs()})
  tmp = os.path.join(out, "samples.json.tmp")
  with open(tmp, "w") as f:
    json.dump(records, f, indent=1)
  os.replace(tmp, os.path.join(out, "samples.json"))
  # Images an earlier run listed and this one did not write would sit beside a samples.json
  # that no longer names them.
  for name in sorted(previous - {r["file"] for r in records}):
    if os.path.isfile(os.path.join(out, name)):
      os.remove(os.path.join(out, name))
  return records


def _listed_samples(out: str) -> set[str]:
  """The NNNN.png files an existing DIR/samples.json lists (empty if none or unreadable)."""
  try:
    with open(os.path.join(out, "samples.json")) as f:
      listed = json.load(f)
    names = {r.get("file") for r in listed if isinstance(r, dict)}
  except (OSError, ValueError, TypeError):
    return set()
  return {n for n in names if isinstance(n, str) and re.fullmatch(r"\d{4,}\.png", n)}


def caption_files(bundle, paths: Sequence[str], *, batch_size: int = 8,
                  **knobs) -> list[dict]:
  """`flowtok caption`: [{"image": path, "caption": text}] for each image file, in order."""
  if not paths:
    raise UserError("no image given")
  cap = Captioner(bundle, batch_size=batch_size, **knobs)
  with progress_on(len(paths), "caption", cap):
    captions = cap.caption_files(list(paths))
  return [{"image": p, "caption": c} for p, c in zip(paths, captions)]


@contextlib.contextmanager
def progress_on(n: int, desc: str, *servers: Optional[_Server]):
  """A progress meter with ETA over n images, fed by `servers` (None ones skipped) and by the
  update function it yields (for work done outside them); detached and closed however the
  block ends. No meter when one server does all n in a single compiled call."""
  live = [s for s in servers if s is not None]
  if len(servers) == 1 and live and n <= live[0].batch_size:
    yield lambda k: None
    return
  bar = progress.meter(n, desc, unit="image")
  for s in live:
    s.progress = bar.update
  try:
    yield bar.update
  finally:
    for s in live:
      s.progress = None
    bar.close()
