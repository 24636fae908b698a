"""The three stages on tiny models: losses drop, direction masking, stop-gradient, GAN/LeCam."""
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowtok_jax import config_lib
from flowtok_jax import losses
from flowtok_jax import sharding
from flowtok_jax.errors import UserError
from flowtok_jax.train import flowtok_step, loop, optim, stage_api, stages

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "configs", "demo.py")
B, L, S = 8, 16, 16
# Tiny programs: XLA's CPU backend optimisations cost far more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_config(stage: str, **sections) -> ml_collections.ConfigDict:
  """The demo's runlocal config at 16 px, merged for `stage`, with section overrides."""
  config = config_lib.load(DEMO + ":runlocal,res=32")
  config = stage_api.config_for_stage(config, stage)
  # config_for_stage copies values, so every image size is set (the demo shares them by reference).
  for section in (config.data, config.clip_image, config.tokenizer):
    section.image_size = S
  config.clip_image.patch_size = 4
  config.tokenizer.patch_size = 4
  config.train.ema_decay = None
  config.flow.depth = 1
  config.optim.update(lr=3e-3, warmup_steps=0, weight_decay=0.0, clip_norm=None)
  for name, values in sections.items():
    if name not in config:
      config[name] = ml_collections.ConfigDict()
    config[name].update(values)
  return config


def context(config, workdir="/nonexistent") -> stage_api.StageContext:
  mesh = sharding.make_mesh(config.mesh)
  return stage_api.StageContext(mesh=mesh, rules=sharding.logical_rules(config.get("sharding")),
                                workdir=workdir, process_index=0, process_count=1,
                                global_batch_size=B, seed=0)


def fixed_batch(vocab: int, seed: int = 0) -> dict:
  """B distinct (image, caption) pairs: smooth random images, ids with EOS and padding."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(size=(B, 4, 4, 3)).astype(np.float32)
  images = np.repeat(np.repeat(coarse, S // 4, axis=1), S // 4, axis=2)
  ids = np.zeros((B, L), np.int32)
  for i in range(B):
    n = rng.integers(5, L - 2)
    ids[i, :n] = rng.integers(4, vocab, size=n)
    ids[i, n] = 3  # EOS; the rest stays pad (0).
  return {"image": images, "text_ids": ids, "truncated": np.zeros((B,), bool)}


def build(stage_name, config):
  return stage_api.get_builder(stage_name)(config, context(config))


def _init(stage, rng):
  """(state, frozen) as the loop makes them, frozen parts randomly initialised (traceable)."""
  batch1 = {k: jnp.asarray(v) for k, v in loop.example_batch_1(stage).items()}
  state = sharding.strip_boxes(loop.make_init_fn(stage, batch1)(rng))
  frozen = {part.name: sharding.strip_boxes(part.init(jax.random.fold_in(rng, 100 + i), batch1))
            for i, part in enumerate(stage.frozen)}
  return state, frozen


def init_all(stage, seed=0):
  return jax.jit(lambda r: _init(stage, r), compiler_options=FAST_COMPILE)(
      jax.random.PRNGKey(seed))


def run_steps(stage, batch, steps, seed=0, probe=None, extra=None):
  """Init + `steps` train steps of the loop's own step on one fixed batch, as ONE program.

  Returns (first state, last state, frozen, per-step metrics as numpy arrays [steps]), plus the
  per-step values of `probe(state)` under the key 'probe' (what a test needs to watch), and
  `extra(first state, frozen)` under 'extra' (computed in the same compiled program).
  """
  step_fn = loop.make_train_step(stage)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(rng, batch):
    state0, frozen = _init(stage, rng)

    def body(state, _):
      state, metrics = step_fn(state, frozen, batch)
      if probe is not None:
        metrics = dict(metrics, probe=probe(state))
      return state, metrics

    state, hist = jax.lax.scan(body, state0, None, length=steps)
    if extra is not None:
      hist = dict(hist, extra=extra(state0, frozen))
    return state0, state, frozen, hist

  state0, state, frozen, hist = run(jax.random.PRNGKey(seed), batch)
  return state0, state, frozen, jax.device_get(hist)


def mean_of(history, key, sl):
  return float(np.mean(history[key][sl]))


# -- clip ------------------------------------------------------------------------------------------

def test_clip_stage_loss_drops():
  config = tiny_config("clip")
  stage = build("clip", config)
  batch = fixed_batch(config.clip_text.vocab_size)
  # The image tower starts with every embedding equal (class-token pooling of a 0.02-init ViT),
  # so the loss sits at log(B) for ~30 steps before the pairs separate.
  _, _, _, hist = run_steps(stage, batch, 60)
  first, last = hist["train/clip_loss"][0], mean_of(hist, "train/clip_loss", slice(-3, None))
  assert last < 0.5 * first, (first, last)
  assert hist["train/acc_i2t"][-1] > 0.5


# -- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_stage_loss_drops_with_gan_and_lecam():
  start = 4
  config = tiny_config("tokenizer", tokenizer_stage=dict(
      gan_weight=0.1, gan_start_step=start, lecam_weight=0.01, lecam_decay=0.9))
  config.discriminator.num_stages = 1
  stage = build("tokenizer", config)
  assert [p.name for p in stage.frozen] == ["clip_text"]  # text-aware decoder
  assert stage.aux is not None and stage.aux.start_step == start
  batch = fixed_batch(config.clip_text.vocab_size)
  disc0 = lambda st: jnp.abs(st.aux_params["disc"]["stem"]["kernel"]).sum()
  probe = lambda st: dict(st.aux_params["lecam"], stem=disc0(st))
  state0, state, _, hist = run_steps(stage, batch, 30, probe=probe)
  anchors, stem = hist["probe"], hist["probe"]["stem"]
  stem0 = float(disc0(state0))
  # Before start_step the discriminator (and its LeCam anchors) is untouched; then it trains.
  np.testing.assert_array_equal(stem[:start], stem0)
  assert stem[start] != stem0 and stem[-1] != stem0
  np.testing.assert_array_equal(anchors["real"][:start], 0.0)
  # Each active step moves the anchors by one EMA step towards that step's mean D(x).
  for i in (start, start + 1, 20):
    for side in ("real", "fake"):
      np.testing.assert_allclose(
          anchors[side][i], 0.9 * anchors[side][i - 1] + 0.1 * hist[f"train/disc_{side}"][i],
          rtol=1e-4, atol=1e-6)
  first, last = hist["train/recon_loss"][0], mean_of(hist, "train/recon_loss", slice(-3, None))
  assert last < 0.5 * first, (first, last)
  assert np.isfinite(hist["train/disc_loss"]).all()


def test_tokenizer_without_gan_has_no_discriminator_and_perceptual_is_checked():
  config = tiny_config("tokenizer")
  stage = build("tokenizer", config)
  assert stage.aux is None
  config = tiny_config("tokenizer", tokenizer_stage=dict(perceptual_weight=1.0,
                                                         perceptual="lpips"))
  with pytest.raises(UserError, match="perceptual"):
    build("tokenizer", config)
  config = tiny_config("tokenizer", tokenizer_stage=dict(recon_kind="l2"))
  with pytest.raises(UserError, match="recon_kind"):
    build("tokenizer", config)


def _perturbed(params, scale=0.05):
  """params + scale · N(0, 1), leaf by leaf (fixed key)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                             for x, k in zip(leaves, keys)])


def test_tokenizer_text_drop_hides_the_caption_from_the_decoder():
  """text_drop_prob 1: the loss cannot depend on the caption; 0: it does; > 1: refused."""
  batch = None
  losses = {}
  for p in (0.0, 1.0):
    config = tiny_config("tokenizer", tokenizer_stage=dict(text_drop_prob=p))
    stage = build("tokenizer", config)
    batch = batch or fixed_batch(config.clip_text.vocab_size)
    other = dict(batch, text_ids=fixed_batch(config.clip_text.vocab_size, seed=1)["text_ids"])
    state, frozen = init_all(stage)
    params = _perturbed(state.params)  # At init the decoder's output hardly reads its inputs.
    loss = jax.jit(lambda b, st=stage, pr=params, f=frozen: st.loss_fn(
        pr, f, b, jax.random.PRNGKey(3), 0, None)[0], compiler_options=FAST_COMPILE)
    losses[p] = (float(loss(batch)), float(loss(other)))
  assert losses[0.0][0] != losses[0.0][1]
  assert losses[1.0][0] == losses[1.0][1]
  with pytest.raises(UserError, match="text_drop_prob"):
    build("tokenizer", tiny_config("tokenizer", tokenizer_stage=dict(text_drop_prob=1.5)))


def test_tokenizer_noise_warmup_ramps_the_posterior_noise():
  """noise_warmup_steps N: step 0 decodes the posterior mean (no dependence on the draw), mid-ramp
  the draw matters, at step >= N the loss is the one without a warm-up; negative N refused."""
  config = tiny_config("tokenizer", tokenizer_stage=dict(noise_warmup_steps=10))
  stage = build("tokenizer", config)
  batch = fixed_batch(config.clip_text.vocab_size)
  state, frozen = init_all(stage)
  # Perturbed params: at init the decoder's output does not depend on z at all.
  params = _perturbed(state.params)

  def recon_loss_of(st):
    return jax.jit(lambda step, rng: st.loss_fn(params, frozen, batch, rng, step,
                                                None)[1].metrics["recon_loss"],
                   compiler_options=FAST_COMPILE)
  recon = recon_loss_of(stage)
  recon_plain = recon_loss_of(build("tokenizer", tiny_config("tokenizer")))
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  assert float(recon(0, k1)) == float(recon(0, k2))
  assert float(recon(5, k1)) != float(recon(5, k2))
  for step in (10, 30):
    assert float(recon(step, k1)) == pytest.approx(float(recon_plain(step, k1)), rel=1e-6)
  with pytest.raises(UserError, match="noise_warmup_steps"):
    build("tokenizer", tiny_config("tokenizer", tokenizer_stage=dict(noise_warmup_steps=-1)))


def test_tokenizer_object_weight_reweights_the_reconstruction_loss():
  """object_weight w: the recon loss is the object-weighted mean (1: the plain mean)."""
  config = tiny_config("tokenizer", tokenizer_stage=dict(object_weight=3.0, object_dilate_px=1))
  # The demo's config (tiny_config's base) sets a weight of its own: 1 here for the plain loss.
  plain = build("tokenizer", tiny_config("tokenizer", tokenizer_stage=dict(object_weight=1.0)))
  stage = build("tokenizer", config)
  batch = fixed_batch(config.clip_text.vocab_size)
  batch["image"][:, : S // 2] = 0.0  # a dark half: background
  state, frozen = init_all(stage)
  k = jax.random.PRNGKey(1)
  aux = stage.loss_fn(state.params, frozen, batch, k, 100, None)[1]
  recon = aux.outputs["recon"]
  w = losses.object_weights(batch["image"], 3.0, 1)
  np.testing.assert_allclose(aux.metrics["recon_loss"],
                             losses.reconstruction_loss(recon, batch["image"], "l2", w), rtol=1e-5)
  aux_plain = plain.loss_fn(state.params, frozen, batch, k, 100, None)[1]
  np.testing.assert_allclose(aux_plain.metrics["recon_loss"],
                             losses.reconstruction_loss(recon, batch["image"]), rtol=1e-5)
  assert float(aux.metrics["recon_loss"]) != pytest.approx(float(aux_plain.metrics["recon_loss"]))
  for bad in (dict(object_weight=0.0), dict(object_dilate_px=-1)):
    with pytest.raises(UserError, match="object_weight must be > 0"):
      build("tokenizer", tiny_config("tokenizer", tokenizer_stage=bad))


# -- flowtok ---------------------------------------------------------------------------------------

def flowtok_config(**flowtok_stage):
  config = tiny_config("flowtok", flowtok_stage=flowtok_stage)
  config.tokenizer.latent_scale = 1.0
  return config


@pytest.fixture(scope="module")
def two_way_run():
  """One compiled program: 40 two-direction steps, plus per-direction flow-loss gradients."""
  # With the reference KL weight the text tokens keep σ ≈ 1 noise and a random tokenizer's
  # posterior is mostly noise, so the flow's irreducible part dominates for hundreds of steps.
  # Both noises are removed here (kl_weight 0, posterior means) to check that the step learns.
  # The text VAE's posterior mean, which the demo's I2T examples flow to, grows as the decoder
  # learns to read it, so its loss need not fall: SPEC's sampled target here.
  config = flowtok_config(p_i2t=0.5, kl_weight=0.0, image_sample=False, dec_weight=1.0,
                          i2t_target_mean=False)
  stage = build("flowtok", config)
  batch = fixed_batch(config.clip_text.vocab_size)

  def per_direction_grads(state0, frozen):
    # Non-zero DiT output layer, so that the flow loss depends on the DiT input at all.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "final_layer" in jax.tree_util.keystr(p) else x, state0.params)

    def per_direction(p):
      _, m = stage.loss_fn(p, frozen, batch, jax.random.PRNGKey(3), jnp.int32(0), None)
      return jnp.stack([m["loss_t2i"], m["loss_i2t"]]), m["frac_i2t"]

    jac, frac = jax.jacrev(per_direction, has_aux=True)(params)
    sq = lambda tree: sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
                          for g in jax.tree.leaves(tree))
    return {"frac_i2t": frac, "text_vae": sq(jac["text_vae"]), "flow": sq(jac["flow"])}

  return stage, run_steps(stage, batch, 40, extra=per_direction_grads)[3]


def test_flowtok_stage_loss_drops_both_directions(two_way_run):
  stage, hist = two_way_run
  assert sorted(p.name for p in stage.frozen) == ["clip_text", "image_encoder"]
  for key in ("train/loss", "train/loss_fm", "train/loss_t2i", "train/loss_i2t",
              "train/dec_ce"):
    first, last = mean_of(hist, key, slice(0, 5)), mean_of(hist, key, slice(-5, None))
    assert last < 0.5 * first, (key, first, last)
  for key in ("train/rel_loss_t2i", "train/rel_loss_i2t", "train/frac_i2t", "train/kl",
              "train/align", "train/null_frac"):
    assert key in hist and np.isfinite(hist[key]).all(), key
  assert 0.2 < mean_of(hist, "train/frac_i2t", slice(None)) < 0.8


def test_i2t_flow_loss_sends_no_gradient_into_the_text_vae(two_way_run):
  grads = two_way_run[1]["extra"]
  assert 0 < float(grads["frac_i2t"]) < 1  # this key mixes both directions
  # Rows: d(loss_t2i), d(loss_i2t). I2T: source z_I (frozen), target stop_gradient(z_T), so
  # nothing reaches the text VAE; T2I: z_T is the source, so the flow loss trains it.
  t2i, i2t = grads["text_vae"]
  assert float(i2t) == 0.0 and float(t2i) > 0
  assert float(grads["flow"][1]) > 0


def test_t2i_only_config_has_no_direction_params_or_i2t_metrics():
  config = flowtok_config(p_i2t=0.0)
  config.flow.two_directions = False
  stage = build("flowtok", config)
  batch1 = loop.example_batch_1(stage)
  params = sharding.strip_boxes(jax.eval_shape(stage.init, jax.random.PRNGKey(0), batch1))
  assert "direction_embedder" not in params["flow"]
  frozen = {p.name: sharding.strip_boxes(jax.eval_shape(p.init, jax.random.PRNGKey(0), batch1))
            for p in stage.frozen}
  _, metrics = jax.eval_shape(
      lambda p, f: stage.loss_fn(p, f, fixed_batch(config.clip_text.vocab_size),
                                 jax.random.PRNGKey(1), jnp.int32(0), None), params, frozen)
  assert "loss_t2i" in metrics and "loss_i2t" not in metrics and "frac_i2t" not in metrics
  # Two-way training needs the direction embedding.
  config = flowtok_config(p_i2t=0.5)
  config.flow.two_directions = False
  with pytest.raises(UserError, match="two_directions"):
    build("flowtok", config)


def test_i2t_examples_read_the_i2t_caption():
  """With 'i2t_text_ids' in the batch, I2T examples encode that caption instead of 'text_ids'
  (every metric, the text decoder's included); T2I-only training ignores it."""
  other = fixed_batch(128, seed=1)["text_ids"]

  def metrics(p_i2t, batch):
    stage = build("flowtok", flowtok_config(p_i2t=p_i2t))
    state, frozen = init_all(stage)
    fn = jax.jit(lambda b: stage.loss_fn(state.params, frozen, b, jax.random.PRNGKey(1),
                                         jnp.int32(0), None)[1],
                 compiler_options=FAST_COMPILE)
    return jax.device_get(fn(batch))

  base = fixed_batch(128)
  mixed = dict(base, i2t_text_ids=other)
  swapped = dict(base, text_ids=other)
  all_i2t, want, plain = metrics(1.0, mixed), metrics(1.0, swapped), metrics(1.0, base)
  for k in ("loss_fm", "loss_i2t", "dec_ce", "kl", "align"):
    np.testing.assert_allclose(all_i2t[k], want[k], rtol=1e-6, err_msg=k)
  assert not np.isclose(all_i2t["dec_ce"], plain["dec_ce"])
  # A direction the run never draws reports no loss (not a 0.0 that reads as perfect).
  assert "loss_t2i" not in all_i2t and "rel_loss_t2i" not in all_i2t
  t2i_only, t2i_plain = metrics(0.0, mixed), metrics(0.0, base)
  assert "loss_t2i" in t2i_only and "loss_i2t" not in t2i_only
  for k in ("loss_fm", "dec_ce", "kl"):
    np.testing.assert_allclose(t2i_only[k], t2i_plain[k], rtol=1e-6, err_msg=k)


def test_flow_pair_swaps_and_stops_gradient():
  z_t = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  z_i = -z_t - 1.0
  d = jnp.array([0, 1])
  src, tgt = flowtok_step.flow_pair(z_t, z_i, d)
  np.testing.assert_array_equal(src[0], z_t[0])  # T2I: text -> image
  np.testing.assert_array_equal(tgt[0], z_i[0])
  np.testing.assert_array_equal(src[1], z_i[1])  # I2T: image -> text
  np.testing.assert_array_equal(tgt[1], z_t[1])
  g = jax.grad(lambda z: flowtok_step.flow_pair(z, z_i, d)[1].sum())(z_t)
  np.testing.assert_array_equal(g, np.zeros_like(g))  # the I2T target carries no gradient
  g = jax.grad(lambda z: flowtok_step.flow_pair(z, z_i, d)[0].sum())(z_t)
  np.testing.assert_array_equal(g[:, 0, 0], [1.0, 0.0])
  # i2t_target_mean: I2T flows to the given text target (no gradient), T2I is unchanged.
  mean = z_t * 0.5
  src2, tgt2 = flowtok_step.flow_pair(z_t, z_i, d, mean)
  np.testing.assert_array_equal(src2, src)
  np.testing.assert_array_equal(tgt2[0], z_i[0])
  np.testing.assert_array_equal(tgt2[1], mean[1])
  g = jax.grad(lambda m: flowtok_step.flow_pair(z_t, z_i, d, m)[1].sum())(mean)
  np.testing.assert_array_equal(g, np.zeros_like(g))


def test_i2t_target_mean_changes_only_the_i2t_examples():
  """Same key, same draws: the T2I examples' loss is identical, the I2T examples' is not, and it
  no longer carries the text posterior's noise (with σ ~ 1 that noise dominates it here)."""
  def metrics(target_mean):
    stage = build("flowtok", flowtok_config(p_i2t=0.5, i2t_target_mean=target_mean))
    state, frozen = init_all(stage)
    fn = jax.jit(lambda b: stage.loss_fn(state.params, frozen, b, jax.random.PRNGKey(1),
                                         jnp.int32(0), None)[1],
                 compiler_options=FAST_COMPILE)
    return jax.device_get(fn(fixed_batch(128)))

  sample, mean = metrics(False), metrics(True)
  assert 0 < sample["frac_i2t"] < 1 and sample["frac_i2t"] == mean["frac_i2t"]
  for k in ("loss_t2i", "kl", "align", "dec_ce"):
    np.testing.assert_allclose(mean[k], sample[k], rtol=1e-6, err_msg=k)
  assert mean["loss_i2t"] < 0.8 * sample["loss_i2t"]


def test_flowtok_section_and_model_checks():
  with pytest.raises(UserError, match="p_i2t"):
    build("flowtok", flowtok_config(p_i2t=1.5))
  with pytest.raises(UserError, match="not a known key"):
    build("flowtok", flowtok_config(p_t2i=0.5))
  with pytest.raises(UserError, match="shards"):
    build("flowtok", flowtok_config(num_shards=3))  # B = 8
  with pytest.raises(UserError, match="shards of 3 examples"):
    build("flowtok", flowtok_config(shard_size=3))
  with pytest.raises(UserError, match="not both"):
    build("flowtok", flowtok_config(shard_size=4, num_shards=2))
  with pytest.raises(UserError, match="t_scale"):
    build("flowtok", flowtok_config(t_scale=0.0))
  config = flowtok_config()
  # A config file (not the CLI, which casts) can still hold a non-number.
  config.flowtok_stage = ml_collections.ConfigDict(
      dict(config.flowtok_stage.to_dict(), i2t_t_loc="abc"))
  with pytest.raises(UserError, match="i2t_t_loc must be a number"):
    build("flowtok", config)
  config = flowtok_config(p_i2t=0.5)
  config.flowtok_stage = ml_collections.ConfigDict(
      dict(config.flowtok_stage.to_dict(), i2t_target_mean="yes"))
  with pytest.raises(UserError, match="i2t_target_mean must be of type bool, like the value"):
    build("flowtok", config)
  config = flowtok_config()
  config.tokenizer.latent_scale = None  # no tokenizer checkpoint -> 1.0 with a warning
  assert stages._latent_scale(config, context(config), None, None,
                              stages._section(config, "flowtok_stage")) == 1.0


def test_shard_size_fixes_the_blocks_whatever_the_mesh():
  """Per-shard semantics by examples per block (the released run: 128 per GPU): the block count
  follows the global batch, not the device count, so the KL sum keeps its weight on any mesh."""
  config = flowtok_config(shard_size=4)  # B = 8 -> 2 blocks.
  sc = stages._section(config, "flowtok_stage")
  assert stages._num_shards(context(config), sc) == 2
  sc.shard_size = None
  assert stages._num_shards(context(config), sc) == 1  # One device: one block.
  paper = config_lib.load(os.path.join(os.path.dirname(DEMO), "flowtok.py"))
  assert paper.flowtok_stage.shard_size == 128 and paper.train.batch_size % 128 == 0


def test_estimate_latent_scale():
  rng = np.random.default_rng(0)
  batches = [{"image": jnp.asarray(rng.normal(size=(4, 3, 2)) * 2.5 + 1.0, jnp.float32)}
             for _ in range(8)]
  encode = lambda x: (x, jnp.full_like(x, -60.0))  # posterior std ~ 0
  scale = flowtok_step.estimate_latent_scale(encode, batches)
  np.testing.assert_allclose(scale, 1 / 2.5, rtol=0.1)
  allz = np.concatenate([np.asarray(b["image"]).ravel() for b in batches])
  np.testing.assert_allclose(scale, 1 / allz.std(), rtol=1e-4)


def test_stage_defaults_are_all_commented_keys():
  d = stages.stage_defaults()
  assert set(d) == {"clip_stage", "tokenizer_stage", "flowtok_stage"}
  assert d.flowtok_stage.p_i2t == 0.0 and d.flowtok_stage.kl_reduction == "sum"


def test_the_loop_feeds_the_i2t_caption_to_the_flowtok_step(shapes_data):
  """data.i2t_caption_key reaches the compiled step through the real pipeline and loop (the
  loop passes only the stage's example_batch keys to the step)."""
  make, root = shapes_data
  dec_ce = {}
  for key in ("reference_caption", None):
    config = make()
    config = stage_api.config_for_stage(config, "flowtok")
    config.data.i2t_caption_key = key
    config.flowtok_stage.p_i2t = 1.0
    config.tokenizer.latent_scale = 1.0
    # One run also evaluates on held-out pairs (the stage's evaluator, through the loop).
    every = 1 if key is None else 0
    config.train.update(total_steps=1, log_every_steps=1, eval_every_steps=every,
                        ema_decay=None)
    stage = build("flowtok", config)
    assert ("i2t_text_ids" in stage.example_batch) == (key is not None)
    assert len(stage.evaluators) == every
    result = loop.train_and_evaluate(config, os.path.join(root, f"flow_{key}"), "flowtok")
    dec_ce[key] = result.last_metrics["train/dec_ce"]
  # Same data order and seed: only the captions the I2T examples encode differ.
  assert dec_ce["reference_caption"] != dec_ce[None]
  ev = result.last_eval
  assert np.isfinite(ev["eval/val/rel_loss_i2t"]) and 0.0 <= ev["eval/val/dec_acc"] <= 1.0
  assert 0.0 <= ev["eval/val/i2t_exact"] <= ev["eval/val/i2t_parse_rate"] <= 1.0


def test_deterministic_loss_has_no_dropout(monkeypatch):
  """deterministic=True (held-out evaluation) equals the same model with dropout rates 0."""
  seen = {}
  real = flowtok_step.flowtok_loss

  def spy(models, lc, *args, **kwargs):
    seen.update(models=models, lc=lc)
    return real(models, lc, *args, **kwargs)

  monkeypatch.setattr(flowtok_step, "flowtok_loss", spy)

  def metrics(rate, deterministic):
    config = flowtok_config(p_i2t=0.5)
    config.text_vae.dropout = rate
    config.text_decoder.dropout = rate
    stage = build("flowtok", config)
    state, frozen = init_all(stage)
    batch = fixed_batch(config.clip_text.vocab_size)
    jax.eval_shape(lambda: stage.loss_fn(state.params, frozen, batch, jax.random.PRNGKey(1),
                                         jnp.int32(0), None))  # the stage's models and lc
    fn = jax.jit(lambda b: real(seen["models"], seen["lc"], state.params, frozen, b,
                                jax.random.PRNGKey(1), deterministic)[1],
                 compiler_options=FAST_COMPILE)
    return jax.device_get(fn(batch))

  off, no_dropout, on = metrics(0.5, True), metrics(0.0, False), metrics(0.5, False)
  for k in ("dec_ce", "dec_acc", "kl", "align", "loss_fm"):
    np.testing.assert_allclose(off[k], no_dropout[k], rtol=1e-6, err_msg=k)
  assert not np.isclose(on["dec_ce"], off["dec_ce"])


@pytest.mark.parametrize("name", ["clip", "tokenizer", "flowtok"])
def test_default_weight_decay_hits_only_weight_matrices(name):
  """The reference tokenizer recipe: no decay on biases (2D fused ones too), norms, embeddings,
  learned positions, latent / mask tokens: with the default exclusions only kernels decay."""
  config = flowtok_config(p_i2t=0.5) if name == "flowtok" else tiny_config(name)
  stage = build(name, config)
  params = sharding.strip_boxes(jax.eval_shape(stage.init, jax.random.PRNGKey(0),
                                               loop.example_batch_1(stage)))
  mask = optim.decay_mask(params, optim.DEFAULT_DECAY_EXCLUDE)
  decayed = {optim.path_name(k) for k, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}
  assert decayed and all(n.endswith("/kernel") for n in decayed), sorted(decayed)
  kernels = {optim.path_name(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if optim.path_name(k).endswith("/kernel")}
  assert decayed == kernels


def test_train_iterators_say_how_much_they_read(monkeypatch):
  """The training iterator tells the pipeline the run's examples (data.preload reads the split
  up front only for a run of an epoch or more); the latent-scale estimate its few batches."""
  from flowtok_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_config("flowtok")
  config.train.total_steps = 7
  seen = []
  monkeypatch.setattr(pipeline, "make_iterator", lambda *a, **kw: seen.append(kw))
  monkeypatch.setattr(stages, "_text_tokenizer", lambda *a: None)
  stages._train_iter(config, context(config))()  # pylint: disable=protected-access
  stages._train_iter(config, context(config), batches=4)()  # pylint: disable=protected-access
  assert [kw["read_examples"] for kw in seen] == [7 * B, 4 * B]
