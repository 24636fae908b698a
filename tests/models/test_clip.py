"""Contrastive CLIP for the demo, and the PatchGAN discriminator."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowtok_jax.models import text

B, L, S = 3, 8, 16


def test_clip_model_embeddings_pooling_and_text_subtree(make_test_model, random_params):
  model = make_test_model("clip_model")
  ids = np.zeros((B, L), np.int32)  # pad = 0 after each caption
  for b, n in enumerate((3, 8, 5)):
    ids[b, :n] = np.random.default_rng(b).integers(1, 50, n)
  ids = jnp.asarray(ids)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (B, S, S, 3)), jnp.float32)
  params = random_params(model, ids, images, scale=0.2)
  # A real init of logit_scale alone (XLA drops the other initialisers: a cheap compile).
  init_scale = jax.jit(lambda k: nn.meta.unbox(model.init(k, ids, images))["params"][
      "logit_scale"])(jax.random.key(0))
  np.testing.assert_allclose(float(init_scale), np.log(1 / 0.07), rtol=1e-6)
  params["params"]["logit_scale"] = nn.meta.replace_boxed(params["params"]["logit_scale"],
                                                         init_scale)

  def run(p, i, im):
    t_emb, i_emb, scale = model.apply(p, i, im)
    feats = text.CLIPTextTower(model.text_cfg).apply({"params": p["params"]["text"]}, i)
    return t_emb, i_emb, scale, feats

  t_emb, i_emb, scale, feats = jax.jit(run)(params, ids, images)
  assert t_emb.shape == i_emb.shape == (B, 16)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(t_emb), axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(i_emb), axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
  # params['text'] is a CLIPTextTower tree; the text embedding pools its last non-pad token.
  proj = np.asarray(nn.meta.unbox(params)["params"]["text_projection"]["kernel"])
  last = np.asarray(feats)[np.arange(B), [2, 7, 4]]
  want = last @ proj
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(t_emb), want, atol=1e-5)


def test_clip_image_tower_and_discriminator_shapes(make_test_model, random_params):
  tower, disc = make_test_model("clip_image"), make_test_model("discriminator")
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (B, S, S, 3)), jnp.float32)
  pt, pd = random_params(tower, images), random_params(disc, images)

  def run(a, b, im):
    return tower.apply(a, im), disc.apply(b, im)

  emb, logits = jax.jit(run)(pt, pd, images)
  assert emb.shape == (B, 16) and emb.dtype == jnp.float32
  assert logits.shape == (B, S // 4, S // 4, 1)  # Two stages: one logit per 4×4 patch.
  p = nn.meta.unbox(pt)["params"]
  assert p["patch_embed"]["kernel"].shape == (4, 4, 3, 32) and "bias" not in p["patch_embed"]
  assert p["positional_embedding"].shape == (1 + (S // 4) ** 2, 32)
  assert p["proj"]["kernel"].shape == (32, 16)
