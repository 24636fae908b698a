"""The three training stages: `clip`, `tokenizer`, `flowtok` (registered with `stage_api`).

Each builder turns its config sections into the models' small frozen dataclasses and returns a
`stage_api.Stage`; the one train loop (`train/loop.py`) does the rest.

  clip       contrastive pretraining of the tiny CLIP (text tower + image tower) for the demo;
             its `params['text']` is the frozen text tower of the later stages.
  tokenizer  FlowTiTok: reconstruction (L2 | L1) + β·KL + optional PatchGAN hinge loss from a
             start step (+ LeCam) + optional perceptual term (train/perceptual.py).
  flowtok    the unified two-direction step of SPEC §3 (`train/flowtok_step.py`).

Stage-specific knobs live in `config.clip_stage`, `config.tokenizer_stage`, `config.flowtok_stage`
(defaults below; `stage_defaults()` lists them all). Earlier stages' checkpoints are named by
`config.init.clip_from` and `config.init.tokenizer_from`.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flowtok_jax import config_lib
from flowtok_jax import losses
from flowtok_jax.errors import UserError
from flowtok_jax.models import clip as clip_lib
from flowtok_jax.models import discriminator as disc_lib
from flowtok_jax.models import flow as flow_lib
from flowtok_jax.models import text as text_lib
from flowtok_jax.models import tokenizer as tok_lib
from flowtok_jax.train import evaluators, flowtok_step, optim, stage_api
from flowtok_jax.train import perceptual as perceptual_lib


def stage_defaults() -> ml_collections.ConfigDict:
  """Every stage-specific key with its default (each commented); configs override them."""
  c = ml_collections.ConfigDict()
  c.clip_stage = ml_collections.ConfigDict(dict(
      negatives="global",  # Contrastive negatives: global (whole batch) | local (per shard).
      num_shards=None,  # Shards of 'local' negatives; None: the data-parallel device count.
      eval_num=256,  # Held-out pairs (data.eval_split) the retrieval evaluator ranks together.
  ))
  c.tokenizer_stage = ml_collections.ConfigDict(dict(
      recon="l2",  # Reconstruction loss: l2 | l1.
      kl_weight=1e-6,  # β of the Gaussian KL (TA-TiTok uses ~1e-6).
      gan_weight=0.0,  # Weight of the hinge generator loss; 0 builds no discriminator.
      gan_start_step=0,  # First step of the GAN terms (generator and discriminator).
      lecam_weight=0.0,  # LeCam regulariser of the discriminator; 0 disables it.
      lecam_decay=0.999,  # EMA decay of the LeCam anchors.
      # Perceptual networks (train/perceptual.py): "lpips", "convnext_s", or several joined
      # with '-' and optionally weighted, "lpips-convnext_s-1.0-0.1" (the reference's); "": none.
      perceptual="",
      perceptual_weight=0.0,  # Weight of the perceptual term (0: none is built).
      # Its weight files, comma-separated, NAME=FILE when several networks are named (lpips:
      # torchvision's VGG16 + the lpips package's vgg.pth heads; convnext_s: torchvision's
      # convnext_small; .pth needs torch, .npz / .safetensors do not).
      perceptual_path="",
      # Share of examples whose text-aware decoder sees zeroed text features, so that the image
      # tokens must carry what a caption would supply (colour): I2T reads the tokens alone.
      text_drop_prob=0.0,
      # Steps over which the posterior noise of the decoder's input ramps linearly from 0 to its
      # full σ (0: full from the start). The latents carry no signal through σ ~ 1 noise at
      # init, and some runs stayed on the all-black plateau for 1000+ steps.
      noise_warmup_steps=0,
      # Reconstruction weight of pixels on or within object_dilate_px of an object (a pixel
      # brighter than 0.1 on the dark background); 1: every pixel alike.
      object_weight=1.0,
      object_dilate_px=3,
      eval_num=256,  # Held-out images (data.eval_split) the reconstruction evaluator reads.
      disc_optim=optim.default_config(),  # Discriminator AdamW (same keys as config.optim).
  ))
  c.flowtok_stage = ml_collections.ConfigDict(dict(
      p_i2t=0.0,  # Share of examples trained image->text; 0 = T2I only (no direction input).
      null_prob=0.1,  # CFG null-indicator marking probability per example.
      fm_weight=1.0,  # Weight of the flow-matching loss.
      kl_weight=0.01,  # γ1: text-VAE KL weight (0.01 with 'sum' is the released code).
      kl_reduction="sum",  # Text KL reduction: sum (over the batch, parity) | mean (per element).
      align_weight=1.0,  # γ2: contrastive alignment weight.
      align_negatives="global",  # Alignment negatives: global | local (per shard, parity).
      dec_weight=1.0,  # Text-decoder CE weight; 0 builds no text decoder.
      image_sample=True,  # z_I = posterior sample (True) or posterior mean.
      # Logit-normal times sigmoid(N(t_loc, t_scale²)) (SPEC: 0, 1). Where the source tokens
      # are not noise, a trained velocity reads the target off x_t for any t > 0; only near t = 0
      # must it map source to target, and N(0, 1) puts 1.4 % of the draws below t = 0.1.
      t_loc=0.0,
      t_scale=1.0,
      i2t_t_loc=None,  # t_loc of the I2T examples (None: t_loc).
      # I2T examples flow to the text posterior mean instead of the sampled z_T (SPEC §3). The
      # sample's σ ~ 1 noise is half the target's variance and cannot be predicted from the
      # image: it only adds noise to the gradient of the image -> text map. Like i2t_t_loc, it
      # has nothing to change when p_i2t = 0.
      i2t_target_mean=False,
      eval_num=256,  # Held-out examples (data.eval_split) of the periodic evaluation.
      latent_scale_batches=4,  # Batches used to estimate tokenizer.latent_scale when None.
      # Per-shard semantics of the reference (null roll, 'local' negatives, KL 'sum' per shard)
      # split the batch into this many blocks; None: the data-parallel device count. Fix it
      # (or shard_size) to make losses independent of the device count.
      num_shards=None,
      # Examples per block instead (num_shards = global batch / shard_size; None: num_shards).
      # The released run summed its KL over 128 examples per GPU (32 GPUs x 128 = 4096): parity
      # on any mesh is shard_size 128, whatever the number of devices.
      shard_size=None,
  ))
  return c


def _section(config, name: str) -> ml_collections.ConfigDict:
  """`config.<name>` over its defaults; a key the defaults do not know is a UserError."""
  out = ml_collections.ConfigDict(stage_defaults()[name].to_dict())
  given = config.get(name)
  if given:
    for key, value in given.items():
      if key not in out:
        raise UserError(f"config.{name}.{key} is not a known key "
                        f"(known: {', '.join(sorted(out))})")
      config_lib.set_typed(
          out, key, value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value,
          name)
  return out


def _dtype(config) -> str:
  return config.get("model_dtype", "float32")


def _num_shards(ctx: stage_api.StageContext, sc) -> int:
  """Blocks of the batch for per-shard semantics: `sc.num_shards`, the global batch over
  `sc.shard_size`, or the data-parallel size."""
  size = sc.get("shard_size")
  if size is not None:
    if sc.get("num_shards"):
      raise UserError("set one of num_shards and shard_size, not both")
    if size < 1 or ctx.global_batch_size % size:
      raise UserError(f"batch size {ctx.global_batch_size} does not split into shards of "
                      f"{size} examples (flowtok_stage.shard_size; None: one per device)")
    return ctx.global_batch_size // size
  n = sc.get("num_shards") or math.prod(ctx.mesh.shape.get(a, 1) for a in ("data", "fsdp"))
  if ctx.global_batch_size % n:
    raise UserError(f"batch size {ctx.global_batch_size} does not split into {n} shards "
                    "(num_shards)")
  return int(n)


def _init_get(config, key: str, default=None):
  init = config.get("init")
  return init.get(key, default) if init else default


def _check_image_size(config, section: str, size: int):
  if config.data.image_size != size:
    raise UserError(f"data.image_size = {config.data.image_size} must equal "
                    f"{section}.image_size = {size}")


def _example_batch(config, i2t_ids: bool = False,
                   latents: bool = False) -> dict[str, np.ndarray]:
  """The keys (and dtypes) a stage's train step receives; the loop leaves every other key of
  the pipeline's batches on the host. `i2t_ids`: also the I2T caption ids, when the data names
  one (`data.i2t_caption_key`). `latents`: stored tokenizer posteriors instead of images."""
  s, l = config.data.image_size, config.data.max_text_len
  if latents:
    kc = (1, config.tokenizer.num_tokens, config.tokenizer.token_channels)
    out = {"latent_mean": np.zeros(kc, np.float32), "latent_logvar": np.zeros(kc, np.float32)}
  else:
    out = {"image": np.zeros((1, s, s, 3), np.float32)}
  out.update(text_ids=np.zeros((1, l), np.int32), truncated=np.zeros((1,), bool))
  if i2t_ids and config.data.get("i2t_caption_key"):
    out["i2t_text_ids"] = np.zeros((1, l), np.int32)
  return out


def text_tokenizer_file(config, workdir: str) -> tuple[Optional[str], list[str]]:
  """(the text tokenizer file a run in `workdir` reads, the places looked): `text_tokenizer.path`
  (a sentencepiece .model or CLIP's tokenizer.json), else W/ or W/../text_tokenizer.model."""
  path = config.text_tokenizer.get("path") if config.get("text_tokenizer") else None
  candidates = [path] if path else [os.path.join(d, "text_tokenizer.model") for d in
                                    (workdir, os.path.dirname(workdir))]
  return next((c for c in candidates if c and os.path.isfile(c)), None), candidates


def _text_tokenizer(config, ctx: stage_api.StageContext):
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  found, candidates = text_tokenizer_file(config, ctx.workdir)
  if found:
    return text_tokenizer.load(found)
  raise UserError(f"no text tokenizer model found (looked for {', '.join(candidates)}); "
                  "train one with `flowtok data text_tokenizer --config ... --out "
                  "W/text_tokenizer.model` or set text_tokenizer.path")


def _fingerprints(config, ctx: stage_api.StageContext) -> dict[str, str]:
  """What the run's token ids depend on (stage_api.Stage.fingerprints): its text tokenizer file
  ({} when there is none yet: the stage's first data read then says so). The tokenizer stage
  adds its perceptual weight files."""
  from flowtok_jax import inference  # pylint: disable=g-import-not-at-top
  found, _ = text_tokenizer_file(config, ctx.workdir)
  return {"text_tokenizer": inference.file_sha256(found)} if found else {}


def _train_iter(config, ctx: stage_api.StageContext, latents_dir: Optional[str] = None,
                batches: Optional[int] = None):
  """The training iterator's factory; `batches`: how many the caller reads (None: the run's)."""
  def make():
    from flowtok_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    read = batches if batches is not None else config_lib.steps("total", config.train)
    return pipeline.make_iterator(
        config.data, _text_tokenizer(config, ctx), split=config.data.train_split,
        global_batch_size=ctx.global_batch_size,
        seed=config.data.get("shuffle_seed", config.seed), process_index=ctx.process_index,
        process_count=ctx.process_count, latents_dir=latents_dir,
        read_examples=read * ctx.global_batch_size)
  return make


def _optimizer(config) -> optim.Optimizer:
  return optim.make(config.optim, total_steps=config_lib.steps("total", config.train))


def _ema(config) -> Optional[float]:
  return config.train.get("ema_decay") if config.get("train") else None


def _clip_text_part(config, ct: text_lib.CLIPTextConfig) -> stage_api.FrozenPart:
  tower = text_lib.CLIPTextTower(ct)
  return stage_api.FrozenPart(
      "clip_text", init=lambda rng, b: tower.init(rng, b["text_ids"])["params"],
      checkpoint=_init_get(config, "clip_from"),
      select=tuple(_init_get(config, "clip_select", ("text",))))


# -- clip --------------------------------------------------------------------------------------

@stage_api.register("clip")
def build_clip(config, ctx: stage_api.StageContext) -> stage_api.Stage:
  """Contrastive pretraining of CLIPModel on (image, caption) pairs."""
  sc = _section(config, "clip_stage")
  ct = text_lib.CLIPTextConfig.from_config(config.clip_text, dtype=_dtype(config))
  ci = clip_lib.CLIPImageConfig.from_config(config.clip_image, dtype=_dtype(config))
  _check_image_size(config, "clip_image", ci.image_size)
  model = clip_lib.CLIPModel(ct, ci)
  shards = _num_shards(ctx, sc)

  def loss_fn(params, frozen, batch, rng, step, aux_params):
    del frozen, rng, step, aux_params
    txt, img, scale = model.apply({"params": params}, batch["text_ids"], batch["image"])
    loss = losses.clip_loss(img, txt, jnp.log(scale), negatives=sc.negatives, num_shards=shards)
    return loss, {"clip_loss": loss, "logit_scale": scale,
                  "acc_i2t": losses.contrastive_accuracy(img, txt),
                  "acc_t2i": losses.contrastive_accuracy(txt, img)}

  def embed_fn(params, frozen, images, ids):
    del frozen
    txt, img, _ = model.apply({"params": params}, ids, images)
    return img, txt

  opt = _optimizer(config)
  return stage_api.Stage(
      name="clip", init=lambda rng, b: model.init(rng, b["text_ids"], b["image"])["params"],
      loss_fn=loss_fn, optimizer=opt.tx, learning_rate=opt.schedule,
      train_iter=_train_iter(config, ctx), example_batch=_example_batch(config),
      ema_decay=_ema(config), fingerprints=_fingerprints(config, ctx),
      evaluators=_retrieval_evaluator(config, ctx, embed_fn, int(sc.eval_num)))


# -- tokenizer ---------------------------------------------------------------------------------

def _with_lecam_anchors(disc_tx: optax.GradientTransformation,
                        decay: float) -> optax.GradientTransformation:
  """The discriminator's optimizer on params {'disc': ..., 'lecam': {'real', 'fake'}}.

  The anchors' loss is 0.5·(a - sg(mean D))², whose gradient is a - mean D; a plain step of
  -(1 - decay)·gradient then performs exactly a ← decay·a + (1 - decay)·mean D, so the LeCam EMA
  lives in the auxiliary params and needs no extra state in the loop. (Hand-written rather than
  optax.multi_transform, whose MaskedNode leaves the sharding code cannot place.)
  """
  def init(params):
    return disc_tx.init(params["disc"])

  def update(grads, state, params=None):
    upd, state = disc_tx.update(grads["disc"], state, None if params is None else params["disc"])
    anchors = jax.tree.map(lambda g: -(1.0 - decay) * g, grads["lecam"])
    return {"disc": upd, "lecam": anchors}, state

  return optax.GradientTransformation(init, update)


@stage_api.register("tokenizer")
def build_tokenizer(config, ctx: stage_api.StageContext) -> stage_api.Stage:
  """FlowTiTok: reconstruction + KL (+ GAN after a start step, + perceptual)."""
  sc = _section(config, "tokenizer_stage")
  # Scalar knobs first: before the perceptual networks' weight files are read and hashed.
  if int(sc.noise_warmup_steps) < 0:
    raise UserError("tokenizer_stage.noise_warmup_steps must be >= 0, got "
                    f"{sc.noise_warmup_steps}")
  if not (sc.object_weight > 0 and sc.object_dilate_px >= 0):
    raise UserError(f"tokenizer_stage.object_weight must be > 0 and object_dilate_px >= 0, got "
                    f"{sc.object_weight} and {sc.object_dilate_px}")
  if not 0.0 <= sc.text_drop_prob <= 1.0:
    raise UserError(f"tokenizer_stage.text_drop_prob must be in [0, 1], got {sc.text_drop_prob}")
  dtype = _dtype(config)
  tc = tok_lib.TokenizerConfig.from_config(config.tokenizer, dtype=dtype)
  _check_image_size(config, "tokenizer", tc.image_size)
  model = tok_lib.FlowTiTok(tc)
  frozen_parts = []
  tower = None
  if tc.text_aware:
    ct = text_lib.CLIPTextConfig.from_config(config.clip_text, dtype=dtype)
    tower = text_lib.CLIPTextTower(ct)
    frozen_parts.append(_clip_text_part(config, ct))
  perceptual = None
  fingerprints = _fingerprints(config, ctx)
  if sc.perceptual_weight:
    part, perceptual, fingerprints["perceptual"] = perceptual_lib.build(sc.perceptual,
                                                                        sc.perceptual_path)
    frozen_parts.append(part)
  use_gan = bool(sc.gan_weight)
  use_lecam = use_gan and bool(sc.lecam_weight)
  disc = None
  if use_gan:
    disc = disc_lib.PatchDiscriminator(
        disc_lib.DiscriminatorConfig.from_config(config.discriminator, dtype=dtype))
  start = int(sc.gan_start_step)

  def text_features(frozen, ids):
    return None if tower is None else tower.apply({"params": frozen["clip_text"]}, ids)

  def init(rng, b):
    feats = None
    if tc.text_aware:
      feats = jnp.zeros((1, tc.text_len, tc.text_width), jnp.float32)
    return model.init({"params": rng, "sample": rng}, b["image"], feats)["params"]

  def loss_fn(params, frozen, batch, rng, step, aux_params):
    images = batch["image"]
    feats = text_features(frozen, batch["text_ids"])
    if feats is not None and sc.text_drop_prob:
      rng, drop_rng = jax.random.split(rng)
      keep = jax.random.bernoulli(drop_rng, 1.0 - sc.text_drop_prob, (feats.shape[0], 1, 1))
      feats = jnp.where(keep, feats, jnp.zeros_like(feats))
    noise = 1.0
    if sc.noise_warmup_steps:
      noise = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(sc.noise_warmup_steps))
    recon, mean, logvar = model.apply({"params": params}, images, feats, noise_scale=noise,
                                      rngs={"sample": rng})
    weights = None
    if sc.object_weight != 1.0:
      weights = losses.object_weights(images, float(sc.object_weight), int(sc.object_dilate_px))
    rec = losses.reconstruction_loss(recon, images, sc.recon, weights)
    kl = losses.gaussian_kl(mean, logvar)
    total = rec + sc.kl_weight * kl
    mse = jnp.mean(jnp.square(jnp.clip(recon, 0, 1) - images))
    metrics = {"recon_loss": rec, "kl": kl, "psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)),
               "posterior_std": jnp.mean(jnp.exp(0.5 * logvar)), "latent_std": jnp.std(mean)}
    if perceptual is not None:
      p = perceptual(frozen["perceptual"], images, recon)
      total = total + sc.perceptual_weight * p
      metrics["perceptual_loss"] = p
    if use_gan:
      gan_g = lambda r: losses.hinge_g_loss(disc.apply({"params": aux_params["disc"]}, r))
      if start > 0:
        # Before start_step the discriminator's pass (and its backward) does not run, as its
        # own update does not (train/loop.py): lax.cond executes one branch. 0 until then.
        shape = jax.eval_shape(gan_g, recon)
        g = jax.lax.cond(step >= start, gan_g,
                         lambda r: jnp.zeros(shape.shape, shape.dtype), recon)
      else:
        g = gan_g(recon)
      total = total + sc.gan_weight * g
      metrics["gan_g_loss"] = g
    return total, stage_api.LossAux(metrics=metrics, outputs={"recon": recon})

  aux = None
  if use_gan:
    def disc_init(rng, b):
      p = {"disc": disc.init(rng, b["image"])["params"]}
      if use_lecam:
        box = lambda: nn.LogicallyPartitioned(jnp.zeros((), jnp.float32), ())
        p["lecam"] = {"real": box(), "fake": box()}
      return p

    def disc_loss(aux_params, outputs, batch, rng, step):
      del rng, step
      apply = lambda x: disc.apply({"params": aux_params["disc"]}, x)
      real, fake = apply(batch["image"]), apply(outputs["recon"])
      d = losses.hinge_d_loss(real, fake)
      metrics = {"disc_hinge": d, "disc_real": jnp.mean(real), "disc_fake": jnp.mean(fake)}
      loss = d
      if use_lecam:
        anchors = aux_params["lecam"]
        ar, af = jax.lax.stop_gradient(anchors["real"]), jax.lax.stop_gradient(anchors["fake"])
        lc = losses.lecam_loss(real, fake, ar, af)
        track = 0.5 * (jnp.square(anchors["real"] - jax.lax.stop_gradient(jnp.mean(real)))
                       + jnp.square(anchors["fake"] - jax.lax.stop_gradient(jnp.mean(fake))))
        loss = loss + sc.lecam_weight * lc + track
        metrics["lecam"] = lc
      return loss, metrics

    disc_opt = optim.make(ml_collections.ConfigDict(sc.disc_optim),
                          total_steps=config_lib.steps("total", config.train)).tx
    if use_lecam:
      disc_opt = _with_lecam_anchors(disc_opt, float(sc.lecam_decay))
    aux = stage_api.AuxModule("disc", init=disc_init, optimizer=disc_opt, loss_fn=disc_loss,
                              start_step=start)

  def recon_fn(params, frozen, images, ids):
    mean, logvar = model.apply({"params": params}, images, method=tok_lib.FlowTiTok.encode)
    out = model.apply({"params": params}, mean, text_features(frozen, ids),
                      method=tok_lib.FlowTiTok.decode)
    return out, jnp.mean(jnp.exp(0.5 * logvar), axis=(1, 2))

  opt = _optimizer(config)
  return stage_api.Stage(
      name="tokenizer", init=init, loss_fn=loss_fn, optimizer=opt.tx, learning_rate=opt.schedule,
      train_iter=_train_iter(config, ctx), example_batch=_example_batch(config),
      frozen=tuple(frozen_parts), aux=aux, ema_decay=_ema(config), fingerprints=fingerprints,
      evaluators=_reconstruction_evaluator(config, ctx, recon_fn, sc.eval_num))


def _cached_text_tokenizer(config, ctx: stage_api.StageContext):
  """A zero-argument getter that loads the sentencepiece model on first use, then reuses it."""
  return functools.cache(lambda: _text_tokenizer(config, ctx))


def _held_out_reader(config, ctx: stage_api.StageContext, num: int, text_tokenizer):
  """A loader of the first `num` examples of data.eval_split, in whole global batches."""
  def read():
    from flowtok_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    make = lambda: pipeline.make_eval_iterator(
        config.data, text_tokenizer(), split=config.data.eval_split,
        global_batch_size=ctx.global_batch_size, process_index=ctx.process_index,
        process_count=ctx.process_count, whole_batches=True)  # Same count on every process.
    return evaluators.held_out_batches(make, num, ctx.global_batch_size, ctx.process_count)
  return read


def _is_shapes(config) -> bool:
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  return config.data.name == builders.SHAPES_NAME


def _retrieval_evaluator(config, ctx: stage_api.StageContext, embed_fn, num: int) -> tuple:
  """CLIP's held-out retrieval evaluator (none when train.eval_every_steps is 0)."""
  every = int(config.train.get("eval_every_steps") or 0)
  if not every:
    return ()
  return (evaluators.retrieval(ctx, every_steps=every, read_batches=_held_out_reader(
      config, ctx, num, _cached_text_tokenizer(config, ctx)), embed_fn=embed_fn,
      split=config.data.eval_split),)


def _reconstruction_evaluator(config, ctx: stage_api.StageContext, recon_fn, num: int) -> tuple:
  """The tokenizer's held-out reconstruction evaluator (none when train.eval_every_steps is 0)."""
  every = int(config.train.get("eval_every_steps") or 0)
  if not every:
    return ()
  text_tokenizer = _cached_text_tokenizer(config, ctx)
  decode = None
  if _is_shapes(config):
    decode = lambda ids: text_tokenizer().decode(ids)
  return (evaluators.reconstruction(ctx, every_steps=every,
                                    read_batches=_held_out_reader(config, ctx, num,
                                                                  text_tokenizer),
                                    recon_fn=recon_fn, decode_text=decode,
                                    split=config.data.eval_split),)


# Held-out FlowTok scalars (eval/<split>/...): the flow loss, per direction relative to its
# target's variance, and the text decoder's token accuracy.
_FLOW_EVAL_METRICS = ("loss_fm", "rel_loss_t2i", "rel_loss_i2t", "dec_acc")


def _flowtok_evaluator(config, ctx: stage_api.StageContext, flow_fn, keys: tuple) -> tuple:
  """FlowTok's held-out evaluator (none when train.eval_every_steps is 0)."""
  every = int(config.train.get("eval_every_steps") or 0)
  if not every:
    return ()
  num = int(_section(config, "flowtok_stage").eval_num)
  text_tokenizer = _cached_text_tokenizer(config, ctx)
  return (evaluators.flowtok(ctx, every_steps=every, read_batches=_held_out_reader(
      config, ctx, num, text_tokenizer), flow_fn=flow_fn, keys=keys,
      decode_text=lambda ids: text_tokenizer().decode(ids),
      shapes_world=_is_shapes(config), split=config.data.eval_split),)


# -- flowtok -----------------------------------------------------------------------------------

def _latent_scale(config, ctx: stage_api.StageContext, encoder: tok_lib.FlowTiTokEncoder,
                  init_fn, sc, latents_dir: Optional[str] = None) -> float:
  """`tokenizer.latent_scale`, or 1/std of the trained tokenizer's latents when it is None.

  The estimate reads the first `flowtok_stage.latent_scale_batches` global batches of the
  training split (same seed, so a resumed run gets the same value) and is written back into
  `config.tokenizer.latent_scale`, so the checkpoint metadata and exports carry it.
  """
  scale = config.tokenizer.get("latent_scale")
  if scale is not None:
    return float(scale)
  # A resumed run keeps the scale it trained with (its tokenizer may have trained on since).
  saved = (ctx.resumed_meta.get("config") or {}).get("tokenizer") or {}
  if saved.get("latent_scale") is not None:
    config.tokenizer.latent_scale = float(saved["latent_scale"])
    return config.tokenizer.latent_scale
  path = _init_get(config, "tokenizer_from")
  if not path:  # (Stored latents always name theirs: pretokenize.check_sources.)
    logging.warning("tokenizer.latent_scale is None and init.tokenizer_from is unset: using 1.0")
    return 1.0
  encode = None
  if not latents_dir:  # Stored posteriors need no encoder.
    from flowtok_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    from flowtok_jax import sharding  # pylint: disable=g-import-not-at-top
    example = {k: jnp.asarray(v) for k, v in _example_batch(config).items()}
    target, _ = sharding.abstract_with_shardings(lambda r: init_fn(r, example), ctx.mesh,
                                                 ctx.rules, jax.random.PRNGKey(0))
    params, _ = ckpt_lib.load_params(path, target,
                                     select=_tokenizer_select(config) + ("encoder",))
    encode = lambda x: encoder.apply({"params": params}, x)
  # A few batches: data.preload must not read the whole split for them.
  it = _train_iter(config, ctx, latents_dir, batches=int(sc.latent_scale_batches))()
  try:
    batches = [ctx.to_global(next(it)) for _ in range(int(sc.latent_scale_batches))]
  finally:
    if hasattr(it, "close"):
      it.close()
  with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
    scale = flowtok_step.estimate_latent_scale(encode, batches, sample=bool(sc.image_sample),
                                               seed=config.seed)
  logging.info("tokenizer.latent_scale estimated from %d batches: %.6f", len(batches), scale)
  config.tokenizer.latent_scale = scale
  return scale


def _tokenizer_select(config) -> tuple:
  return tuple(_init_get(config, "tokenizer_select", ()) or ())


@stage_api.register("flowtok")
def build_flowtok(config, ctx: stage_api.StageContext) -> stage_api.Stage:
  """The unified FlowTok step (SPEC §3): text VAE + alignment MLP + DiT (+ text decoder)."""
  from flowtok_jax.models import info  # pylint: disable=g-import-not-at-top
  sc = _section(config, "flowtok_stage")
  dtype = _dtype(config)
  info.check_model_config(config)
  fc = flow_lib.FlowConfig.from_config(config.flow, dtype=dtype)
  p_i2t = float(sc.p_i2t)
  if not float(sc.t_scale) > 0:
    raise UserError(f"flowtok_stage.t_scale must be > 0, got {sc.t_scale}")
  i2t_t_loc = sc.i2t_t_loc
  if i2t_t_loc is not None:
    if isinstance(i2t_t_loc, bool) or not isinstance(i2t_t_loc, (int, float)):
      raise UserError(f"flowtok_stage.i2t_t_loc must be a number or None, got {i2t_t_loc!r}")
    i2t_t_loc = float(i2t_t_loc)
  if not 0.0 <= p_i2t <= 1.0:
    raise UserError(f"flowtok_stage.p_i2t must be in [0, 1], got {p_i2t}")
  if p_i2t > 0 and not fc.two_directions:
    raise UserError("flowtok_stage.p_i2t > 0 trains image-to-text too: set "
                    "flow.two_directions = True")
  ct = text_lib.CLIPTextConfig.from_config(config.clip_text, dtype=dtype)
  tc = tok_lib.TokenizerConfig.from_config(config.tokenizer, dtype=dtype)
  _check_image_size(config, "tokenizer", tc.image_size)
  decoder = None
  if sc.dec_weight:
    if config.get("text_decoder") is None:
      raise UserError("flowtok_stage.dec_weight > 0 needs a text_decoder section")
    decoder = text_lib.TextDecoder(
        text_lib.TextDecoderConfig.from_config(config.text_decoder, dtype=dtype))
  models = flowtok_step.FlowTokModels(
      flow=flow_lib.FlowTransformer(fc),
      text_vae=text_lib.TextVAE(text_lib.TextVAEConfig.from_config(config.text_vae, dtype=dtype)),
      align_mlp=text_lib.AlignMLP(
          text_lib.AlignMLPConfig.from_config(config.align_mlp, dtype=dtype)),
      text_decoder=decoder, clip_text=text_lib.CLIPTextTower(ct),
      image_encoder=tok_lib.FlowTiTokEncoder(tc))
  feats1 = jnp.zeros((1, ct.max_len, ct.width), jnp.float32)

  # Only the tokenizer's encoder is frozen in: the flow never decodes during training (and a
  # paper-scale decoder is a ViT-L that would sit idle in device memory).
  # Pre-tokenized data (`flowtok data pretokenize`): the train batches carry the stored
  # posteriors instead of images; the frozen encoder stays for the held-out evaluator's images.
  latents_dir = config.data.get("latents_dir")
  if latents_dir:
    from flowtok_jax.tools import pretokenize  # pylint: disable=g-import-not-at-top
    meta = pretokenize.read_meta(latents_dir)
    pretokenize.check_meta(meta, config, config.data.train_split)
    pretokenize.check_sources(meta, config)
  image1 = jnp.zeros((1, tc.image_size, tc.image_size, 3), jnp.float32)
  encoder_init = lambda rng, b: models.image_encoder.init(rng, image1)["params"]
  scale = _latent_scale(config, ctx, models.image_encoder, encoder_init, sc, latents_dir)
  lc = flowtok_step.FlowTokLossConfig(
      p_i2t=p_i2t, null_prob=float(sc.null_prob), fm_weight=float(sc.fm_weight),
      kl_weight=float(sc.kl_weight), kl_reduction=sc.kl_reduction,
      align_weight=float(sc.align_weight), align_negatives=sc.align_negatives,
      dec_weight=float(sc.dec_weight), image_sample=bool(sc.image_sample), latent_scale=scale,
      t_loc=float(sc.t_loc), t_scale=float(sc.t_scale),
      i2t_t_loc=i2t_t_loc, i2t_target_mean=sc.i2t_target_mean,
      num_shards=_num_shards(ctx, sc), pad_id=ct.pad_id)
  if lc.kl_reduction not in losses.KL_REDUCTIONS:
    raise UserError(f"flowtok_stage.kl_reduction must be one of {losses.KL_REDUCTIONS}")
  if lc.align_negatives not in losses.NEGATIVES:
    raise UserError(f"flowtok_stage.align_negatives must be one of {losses.NEGATIVES}")

  def init(rng, b):
    k_flow, k_vae, k_align, k_dec = jax.random.split(rng, 4)
    z = jnp.zeros((1, fc.num_tokens, fc.channels), jnp.float32)
    zero = jnp.zeros((1,), jnp.int32)
    params = {
        "flow": models.flow.init(k_flow, z, jnp.zeros((1,)), zero,
                                 zero if fc.two_directions else None)["params"],
        "text_vae": models.text_vae.init(k_vae, feats1)["params"],
        "align_mlp": models.align_mlp.init(k_align, feats1)["params"],
    }
    if decoder is not None:
      params["text_decoder"] = decoder.init(k_dec, z)["params"]
    return params

  def loss_fn(params, frozen, batch, rng, step, aux_params):
    del step, aux_params
    return flowtok_step.flowtok_loss(models, lc, params, frozen, batch, rng)

  frozen_parts = (
      _clip_text_part(config, ct),
      stage_api.FrozenPart("image_encoder", init=encoder_init,
                           checkpoint=_init_get(config, "tokenizer_from"),
                           select=_tokenizer_select(config) + ("encoder",)),
  )
  def flow_fn(params, frozen, batch):
    """Held-out losses (the training objective, fixed key, no dropout) and, two-way, greedy I2T
    captions."""
    _, metrics = flowtok_step.flowtok_loss(models, lc, params, frozen, batch,
                                           jax.random.PRNGKey(config.seed), deterministic=True)
    metrics = {k: v for k, v in metrics.items() if k in _FLOW_EVAL_METRICS}
    ids = None
    if p_i2t > 0 and decoder is not None:
      # The bundle's I2T path (inference.velocity_fn / text_ids read only `.flow` and
      # `.text_decoder`, which FlowTokModels has too); only the encoder differs: here it is the
      # frozen encoder alone, not the whole tokenizer.
      # pylint: disable-next=g-import-not-at-top
      from flowtok_jax import export, flow_matching, inference
      mean, _ = models.image_encoder.apply({"params": frozen["image_encoder"]}, batch["image"])
      knobs = export.I2T_DEFAULTS
      z_text = flow_matching.sample(inference.velocity_fn(models, params["flow"]), mean * scale,
                                    steps=knobs["steps"], cfg_scale=knobs["cfg_scale"],
                                    sampler=knobs["sampler"], grid=knobs["grid"], direction=1)
      ids = inference.text_ids(models, params, z_text)
    return metrics, ids

  example = _example_batch(config, i2t_ids=True, latents=bool(latents_dir))
  opt = _optimizer(config)
  from flowtok_jax import flops  # pylint: disable=g-import-not-at-top
  return stage_api.Stage(
      name="flowtok", init=init, loss_fn=loss_fn, optimizer=opt.tx, learning_rate=opt.schedule,
      train_iter=_train_iter(config, ctx, latents_dir), example_batch=example,
      frozen=frozen_parts, ema_decay=_ema(config), fingerprints=_fingerprints(config, ctx),
      # Held-out batches are images (the evaluator encodes them), stored posteriors or not.
      evaluators=_flowtok_evaluator(config, ctx, flow_fn,
                                    tuple(_example_batch(config, i2t_ids=True))),
      # Model FLOPs (flops.py) of the whole step for perf/mfu: trained parts 3x, frozen 1x.
      flops_per_step=flops.train_step_flops(config, ctx.global_batch_size,
                                            pretokenized=bool(latents_dir))["total"])
