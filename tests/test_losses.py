"""Losses against small numpy hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowtok_jax import losses
from flowtok_jax.errors import UserError

RNG = np.random.default_rng(0)
# One compiled program per call shape: eager dispatch of each small op is slower than compiling.
contrastive = jax.jit(losses.contrastive_loss, static_argnames=("negatives", "num_shards"))


def _np_ce(logits, labels):
  logits = logits - logits.max(axis=1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def _np_clip(a, b, tau):
  a = a.reshape(len(a), -1)
  b = b.reshape(len(b), -1)
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  logits = np.exp(tau) * a @ b.T
  labels = np.arange(len(a))
  return 0.5 * (_np_ce(logits, labels).mean() + _np_ce(logits.T, labels).mean())


def test_text_kl_sum_and_mean():
  mu = RNG.normal(size=(2, 3, 4)) * 4
  lv = RNG.normal(size=(2, 3, 4))
  terms = 1 + lv - (0.3 * mu) ** 6 - np.exp(lv)
  np.testing.assert_allclose(losses.text_kl(mu, lv, "sum"), -0.5 * terms.sum(), rtol=1e-5)
  np.testing.assert_allclose(losses.text_kl(mu, lv, "mean"), -0.5 * terms.mean(), rtol=1e-5)
  # Per-shard sums averaged over 2 shards (the reference's per-GPU sum under DDP averaging).
  np.testing.assert_allclose(losses.text_kl(mu, lv, "sum", num_shards=2), -0.25 * terms.sum(),
                             rtol=1e-5)
  # The penalty is (0.3μ)^6, not μ²: a standard-normal posterior at μ = 1 costs ~0.3^6/2 each.
  ones = np.ones((1, 1, 1))
  np.testing.assert_allclose(losses.text_kl(ones, 0 * ones), 0.5 * 0.3 ** 6, rtol=1e-4)
  with pytest.raises(UserError, match="reduction"):
    losses.text_kl(mu, lv, "batchmean")


def test_gaussian_kl_hand():
  mu = RNG.normal(size=(3, 5, 2))
  lv = RNG.normal(size=(3, 5, 2))
  per_ex = 0.5 * (mu ** 2 + np.exp(lv) - 1 - lv).sum(axis=(1, 2))
  np.testing.assert_allclose(losses.gaussian_kl(mu, lv), per_ex.mean(), rtol=1e-5)
  assert float(losses.gaussian_kl(np.zeros((2, 4)), np.zeros((2, 4)))) == 0.0


def test_contrastive_global_matches_numpy():
  a = RNG.normal(size=(6, 4, 3)).astype(np.float32)
  b = RNG.normal(size=(6, 4, 3)).astype(np.float32)
  tau = np.log(1 / 0.07)
  got = contrastive(a, b, jnp.float32(tau), negatives="global")
  np.testing.assert_allclose(got, _np_clip(a, b, tau), rtol=1e-5)
  # Perfectly paired, well separated rows give a small loss; shuffled pairs a large one.
  eye = np.eye(6, dtype=np.float32)
  assert float(losses.clip_loss(eye, eye, jnp.float32(tau))) < 1e-3
  assert float(losses.alignment_loss(eye, eye[::-1], jnp.float32(tau))) > 5.0


def test_contrastive_local_averages_per_shard_blocks():
  a = RNG.normal(size=(8, 6)).astype(np.float32)
  b = RNG.normal(size=(8, 6)).astype(np.float32)
  tau = 1.3
  expected = np.mean([_np_clip(a[i:i + 2], b[i:i + 2], tau) for i in range(0, 8, 2)])
  got = contrastive(a, b, tau, negatives="local", num_shards=4)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # With one shard 'local' is 'global'; with several they differ.
  np.testing.assert_allclose(contrastive(a, b, tau, negatives="local", num_shards=1),
                             _np_clip(a, b, tau), rtol=1e-5)
  assert abs(float(got) - _np_clip(a, b, tau)) > 1e-3
  with pytest.raises(UserError, match="shards"):
    losses.contrastive_loss(a, b, tau, negatives="local", num_shards=3)
  with pytest.raises(UserError, match="negatives"):
    losses.contrastive_loss(a, b, tau, negatives="all")


def test_contrastive_gradient_reaches_log_scale():
  a = RNG.normal(size=(4, 5)).astype(np.float32)
  b = a + 0.1 * RNG.normal(size=(4, 5)).astype(np.float32)
  g = jax.jit(jax.grad(lambda t: losses.clip_loss(a, b, t)))(jnp.float32(0.0))
  # Matched pairs are the most similar: a larger scale lowers the loss.
  assert float(g) < 0
  acc = losses.contrastive_accuracy(a, b)
  assert float(acc) == 1.0


def test_reconstruction():
  p = RNG.normal(size=(2, 4, 4, 3))
  t = RNG.normal(size=(2, 4, 4, 3))
  np.testing.assert_allclose(losses.reconstruction_loss(p, t), ((p - t) ** 2).mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.reconstruction_loss(p, t, "l1"), np.abs(p - t).mean(),
                             rtol=1e-5)
  with pytest.raises(UserError, match="reconstruction"):
    losses.reconstruction_loss(p, t, "huber")


def test_object_weights_cover_the_object_and_its_dilated_box():
  images = np.zeros((1, 12, 12, 3), np.float32)
  images[0, 4:7, 5:8, 1] = 0.8  # a 3 x 3 object
  images[0, 0, 0, 2] = 0.05  # below the threshold: background
  w = np.asarray(losses.object_weights(images, 4.0, 1))[0, :, :, 0]
  expect = np.ones((12, 12), np.float32)
  expect[3:8, 4:9] = 4.0  # the object grown by one pixel on every side
  np.testing.assert_array_equal(w, expect)
  np.testing.assert_array_equal(np.asarray(losses.object_weights(images, 4.0, 0))[0, :, :, 0]
                                > 1, images[0].max(-1) > 0.1)
  p = RNG.normal(size=images.shape).astype(np.float32)
  weighted = losses.reconstruction_loss(p, images, "l2", losses.object_weights(images, 4.0, 1))
  w3 = np.broadcast_to(w[None, :, :, None], images.shape)
  np.testing.assert_allclose(weighted, (w3 * (p - images) ** 2).sum() / w3.sum(), rtol=1e-5)
  # Weight 1: the plain mean.
  np.testing.assert_allclose(
      losses.reconstruction_loss(p, images, "l2", losses.object_weights(images, 1.0, 1)),
      losses.reconstruction_loss(p, images), rtol=1e-6)


def test_object_weights_match_a_square_dilation_at_the_edges():
  images = np.zeros((2, 16, 16, 3), np.float32)
  hits = RNG.random((2, 16, 16)) > 0.95
  images[..., 0] = np.where(hits, 0.9, 0.0)
  images[0, 0, 15, 2] = images[1, 15, 0, 1] = 0.5  # corners: the window is cut by the border
  w = np.asarray(losses.object_weights(images, 3.0, 3))[..., 0]
  fg = images.max(-1) > 0.1
  expect = np.ones((2, 16, 16), np.float32)
  for b, y, x in zip(*np.nonzero(fg)):
    expect[b, max(y - 3, 0):y + 4, max(x - 3, 0):x + 4] = 3.0
  np.testing.assert_array_equal(w, expect)


def test_hinge_and_lecam():
  real = np.array([[2.0, 0.5], [-1.0, 1.0]])
  fake = np.array([[-2.0, 0.0], [0.5, -0.5]])
  d = 0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean())
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), d, rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), -fake.mean(), rtol=1e-6)
  er, ef = 0.3, -0.2
  lc = (np.maximum(real - ef, 0) ** 2).mean() + (np.maximum(er - fake, 0) ** 2).mean()
  np.testing.assert_allclose(losses.lecam_loss(real, fake, er, ef), lc, rtol=1e-6)
  nr, nf = losses.lecam_ema_update(er, ef, real, fake, decay=0.9)
  np.testing.assert_allclose([nr, nf], [0.9 * er + 0.1 * real.mean(), 0.9 * ef + 0.1 * fake.mean()],
                             rtol=1e-6)


def test_masked_token_ce():
  logits = RNG.normal(size=(2, 3, 5)).astype(np.float32)
  ids = np.array([[1, 4, 0], [2, 0, 0]])
  mask = ids != 0
  ce = np.stack([_np_ce(logits[i], ids[i]) for i in range(2)])
  expected = (ce * mask).sum() / mask.sum()
  np.testing.assert_allclose(losses.masked_token_ce(logits, ids, mask), expected, rtol=1e-5)
  # Pads do not count: changing their logits leaves the loss unchanged.
  logits2 = logits.copy()
  logits2[~mask] = 100.0
  np.testing.assert_allclose(losses.masked_token_ce(logits2, ids, mask), expected, rtol=1e-5)
  assert float(losses.masked_token_ce(logits, ids, np.zeros_like(mask))) == 0.0
  perfect = np.eye(5, dtype=np.float32)[ids] * 50
  assert float(losses.masked_token_accuracy(perfect, ids, mask)) == 1.0
