"""PSNR, SSIM, the Fréchet distance and the in-project feature network."""
import math

import ml_collections
import numpy as np
import pytest
import scipy.linalg

from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import image_metrics as im

C1, C2 = 0.01 ** 2, 0.03 ** 2


# --- PSNR ---------------------------------------------------------------------------------------


def test_psnr_known_values():
  a = np.zeros((2, 8, 8, 3))
  b = a.copy()
  b[0] += 0.1  # MSE 0.01 -> 20 dB.
  out = im.psnr(a, b)
  assert out[0] == pytest.approx(20.0) and out[1] == math.inf
  # uint8: 0 vs 255 everywhere is MSE 1 on the [0, 1] scale -> 0 dB.
  assert im.psnr(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)) == 0.0
  # Half the pixels off by 0.2: MSE 0.02 -> 10 log10(50).
  c = np.zeros((8, 8, 3))
  c[:4] = 0.2
  assert im.psnr(np.zeros((8, 8, 3)), c) == pytest.approx(10 * math.log10(50))


# --- SSIM ---------------------------------------------------------------------------------------


def _ssim_by_loops(a, b, win=11, sigma=1.5):
  """SSIM of one [H, W, C] pair with an explicit 2D window at every valid position."""
  x = np.arange(win) - (win - 1) / 2
  w2 = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
  w2 /= w2.sum()
  vals = []
  for ch in range(a.shape[2]):
    for i in range(a.shape[0] - win + 1):
      for j in range(a.shape[1] - win + 1):
        pa, pb = a[i:i + win, j:j + win, ch], b[i:i + win, j:j + win, ch]
        ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
        va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
        cov = (w2 * (pa - ma) * (pb - mb)).sum()
        vals.append((2 * ma * mb + C1) * (2 * cov + C2)
                    / ((ma ** 2 + mb ** 2 + C1) * (va + vb + C2)))
  return np.mean(vals)


def test_ssim_identical_is_one_and_constant_shift_matches_formula():
  rng = np.random.default_rng(0)
  x = rng.random((2, 16, 16, 3))
  assert im.ssim(x, x) == pytest.approx([1.0, 1.0])
  # Constant images a and a + c: variances and covariance vanish, only luminance is left.
  a, c = 0.3, 0.2
  got = im.ssim(np.full((16, 16, 3), a), np.full((16, 16, 3), a + c))
  assert got == pytest.approx((2 * a * (a + c) + C1) / (a ** 2 + (a + c) ** 2 + C1))


def test_ssim_matches_the_windowed_definition():
  rng = np.random.default_rng(1)
  a = rng.random((14, 13, 2))
  b = np.clip(a + 0.1 + 0.1 * rng.standard_normal(a.shape), 0, 1)  # Shift plus noise.
  assert im.ssim(a, b) == pytest.approx(_ssim_by_loops(a, b), rel=1e-10)


def test_ssim_falls_with_noise_and_checks_inputs():
  rng = np.random.default_rng(2)
  x = rng.random((16, 16, 3))
  scores = [im.ssim(x, np.clip(x + s * rng.standard_normal(x.shape), 0, 1))
            for s in (0.01, 0.1, 0.3)]
  assert scores[0] > scores[1] > scores[2]
  with pytest.raises(UserError):
    im.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))  # Smaller than the window.
  with pytest.raises(UserError):
    im.psnr(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))


# --- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_closed_forms():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(4), rng.standard_normal(4)
  d1, d2 = rng.random(4) + 0.1, rng.random(4) + 0.1
  # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2.
  expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
  assert im.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected)
  # Rotating both by the same orthogonal matrix changes nothing.
  q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
  s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
  assert im.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)
  # General (non-commuting) covariances: the textbook formula with scipy's sqrtm.
  a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
  s1, s2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
  direct = (((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2)
            - 2 * np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2))))
  assert im.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_of_samples():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4000, 3))
  assert im.frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
  # Shifting a set moves only the mean term.
  shift = np.array([1.0, -2.0, 0.5])
  assert im.frechet_distance_features(x, x + shift) == pytest.approx((shift ** 2).sum())
  # N(0, I) vs N(mu, 4 I): |mu|^2 + 3 (2 - 1)^2, up to sampling error.
  y = 2 * rng.standard_normal((4000, 3)) + shift
  assert im.frechet_distance_features(x, y) == pytest.approx((shift ** 2).sum() + 3, rel=0.05)
  # Singular covariances (dead features, fewer samples than dimensions) stay finite.
  z = np.zeros((10, 32))
  z[:, :3] = rng.standard_normal((10, 3))
  assert math.isfinite(im.frechet_distance_features(z, z + 1.0))


# --- The feature network ------------------------------------------------------------------------


def test_feature_net_learns_colour_and_shape_and_separates_distributions():
  cfg = shapes.ShapesConfig(image_size=32)
  train = im.one_object_examples(cfg, 0, "train", 600)
  val = im.one_object_examples(cfg, 0, "val", 200)
  # A smaller net and a short run than the default (which reaches 0.96 on both at 64 px with
  # 300 steps of 128): enough to show it learns.
  net = im.train_feature_net(train, val, steps=150, batch_size=64, features_dim=32,
                             channels=(8, 16, 32))
  # Chance is 1/6 for colour and 1/18 for both: broken labels or a broken net stay near those.
  assert net.val_accuracy["color"] >= 0.85, net.val_accuracy
  assert net.val_accuracy["both"] >= 0.25, net.val_accuracy
  real_a = np.stack([shapes.render_example(0, "test", i, cfg)["image"] for i in range(100)])
  real_b = np.stack([shapes.render_example(0, "test", i, cfg)["image"] for i in range(100, 200)])
  noise = np.random.default_rng(0).integers(0, 60, real_a.shape).astype(np.uint8)
  same = net.frechet(real_a, real_b)
  assert net.frechet(real_a, real_a) == pytest.approx(0.0, abs=1e-6)
  assert net.frechet(real_a, noise) > 5 * same
  # Saved and restored, it gives the same features (64-px input is box-filtered to 32).
  back = im.FeatureNet.from_bytes(net.to_bytes())
  np.testing.assert_allclose(back.features(real_a[:5]), net.features(real_a[:5]), rtol=1e-6)
  assert back.val_accuracy == net.val_accuracy
  big = np.repeat(np.repeat(real_a[:5], 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(net.features(big), net.features(real_a[:5]), rtol=1e-5, atol=1e-6)


def test_feature_net_for_reads_train_and_val_of_the_config(runlocal_config, monkeypatch):
  seen = {}

  def fake_train(train, val, steps, seed):
    seen.update(train=train, val=val, steps=steps)
    return "net"

  monkeypatch.setattr(im, "train_feature_net", fake_train)
  data = runlocal_config.data
  assert im.feature_net_for(data, steps=7, num_train=40, num_val=30) == "net"
  cfg = shapes.ShapesConfig(image_size=data.image_size, heldout=tuple(data.shapes.heldout),
                            two_object_fraction=data.shapes.two_object_fraction,
                            paraphrase_prob=data.shapes.paraphrase_prob)
  expected = im.one_object_examples(cfg, data.shapes.seed, "train", 40)
  np.testing.assert_array_equal(seen["train"][0], expected[0])
  np.testing.assert_array_equal(seen["train"][1], expected[1])
  assert len(seen["val"][0]) < 30 and seen["steps"] == 7  # One-object val scenes only.
  held = {tuple(p.split()) for p in data.shapes.heldout}
  pairs = {(shapes.COLORS[c], shapes.SHAPES[s]) for c, s in zip(*seen["train"][1:])}
  assert pairs and not pairs & held  # The TRAIN split: no held-out pair.
  with pytest.raises(UserError, match="captioned_shapes"):
    im.feature_net_for(ml_collections.ConfigDict({"name": "coco"}))
