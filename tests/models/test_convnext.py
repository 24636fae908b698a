"""ConvNeXt-S: parity with torchvision (a stored fixture), its antialiased resize, its weight
map against convnext_small's real keys, and the combined perceptual term of the reference."""
import functools
import os

import convnext_fixture as fx
import jax
import jax.numpy as jnp
import lpips_fixture
import numpy as np
import pytest

from flowtok_jax.errors import UserError
from flowtok_jax.models import convnext as cn
from flowtok_jax.models import layers
from flowtok_jax.models import lpips
from flowtok_jax.train import perceptual

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def fixture():
  with np.load(os.path.join(HERE, "convnext_parity.npz")) as f:
    return {k: f[k] for k in f.files}


def _tiny():
  return cn.ConvNeXt(depths=fx.TINY["depths"], dims=fx.TINY["dims"],
                     num_classes=fx.TINY["num_classes"])


def _tiny_params(fixture):
  sd = fx.synthetic_state_dict(fx.spec_of(fixture["keys"], fixture["shapes"]))
  return sd, cn.params_from_state_dict(sd, net=_tiny())


def test_logits_match_torchvision(fixture):
  """Enlarged (64 -> 224) and shrunk (256 x 240 -> 224, where antialiasing acts) inputs."""
  _, params = _tiny_params(fixture)
  net = _tiny()
  fwd = jax.jit(lambda p, x: net.apply({"params": p}, cn.prepare(x)))
  for i, x in enumerate(fx.images()):
    want = fixture[f"logits_{i}"]
    np.testing.assert_allclose(np.asarray(fwd(params, x)), want, rtol=0,
                               atol=2e-5 * np.abs(want).max())
  # The shrink's antialiasing matters: torch's plain bilinear moves the logits far off.
  x = fx.images()[1]
  plain = jnp.einsum("oh,bhwc->bowc", layers.bilinear_matrix(x.shape[1], 224), x)
  plain = jnp.einsum("pw,bowc->bopc", layers.bilinear_matrix(x.shape[2], 224), plain)
  off = net.apply({"params": params}, (plain - jnp.asarray(cn.MEAN)) / jnp.asarray(cn.STD))
  assert np.abs(np.asarray(off) - fixture["logits_1"]).max() > 0.01 * np.abs(
      fixture["logits_1"]).max()


def test_antialiased_matrix_rows():
  """Rows sum to 1; a 2x shrink averages pixel pairs with their neighbours by a triangle of
  width 2 (weights 1/8, 3/8, 3/8, 1/8); an enlargement is plain bilinear."""
  m = layers.bilinear_matrix(16, 8, antialias=True)
  np.testing.assert_allclose(m.sum(1), 1.0)
  np.testing.assert_allclose(m[3, 5:9], [1 / 8, 3 / 8, 3 / 8, 1 / 8])
  np.testing.assert_allclose(m[0, :3], [3 / 7, 3 / 7, 1 / 7])  # The border renormalised.
  np.testing.assert_array_equal(layers.bilinear_matrix(8, 20, antialias=True),
                                layers.bilinear_matrix(8, 20))


def test_weight_map_covers_convnext_small(fixture):
  """Every key of torchvision's convnext_small (344, from the fixture) maps onto `ConvNeXt()`
  and is used; bad files are one-line errors."""
  spec = fx.spec_of(fixture["small_keys"], fixture["small_shapes"])
  sd = {k: np.zeros(s, np.float32) for k, s in spec}
  sd["features.5.26.block.0.weight"] = np.arange(384 * 49, dtype=np.float32).reshape(384, 1, 7, 7)
  params = cn.params_from_state_dict(sd)
  assert sum(x.size for x in jax.tree.leaves(params)) == 50_223_688  # torchvision: 50.2 M.
  np.testing.assert_array_equal(params["features_5_26"]["block_0"]["kernel"],
                                sd["features.5.26.block.0.weight"].transpose(2, 3, 1, 0))
  assert params["features_7_2"]["layer_scale"].shape == (768,)
  with pytest.raises(UserError, match="missing 'classifier.2.bias'"):
    cn.params_from_state_dict({k: v for k, v in sd.items() if k != "classifier.2.bias"})
  with pytest.raises(UserError, match=r"'features.0.0.weight' has shape \(96, 3, 3, 3\)"):
    cn.params_from_state_dict({**sd, "features.0.0.weight": np.zeros((96, 3, 3, 3))})
  with pytest.raises(UserError, match="unexpected key 'fc.weight'"):
    cn.params_from_state_dict({**sd, "fc.weight": np.zeros(3)})


def test_perceptual_spec_and_files(tmp_path, monkeypatch):
  assert perceptual.parse("lpips-convnext_s-1.0-0.1") == {"lpips": 1.0, "convnext_s": 0.1}
  assert perceptual.parse("convnext_s") == {"convnext_s": 1.0}
  for bad, msg in (("vgg", "names no registered"), ("lpips-1.0-2.0", "1 networks need 1"),
                   ("lpips-convnext_s-x", "'x' is neither"), ("lpips-lpips", "twice"),
                   ("lpips-convnext_s-0-0", "positive sum")):
    with pytest.raises(UserError, match=msg):
      perceptual.parse(bad)
  monkeypatch.chdir(tmp_path)
  for f in "abc":
    (tmp_path / f).write_bytes(b"")
  names = ["lpips", "convnext_s"]
  assert perceptual.assign_files(names, "lpips=a,convnext_s=b, lpips=c") == {
      "lpips": ["a", "c"], "convnext_s": ["b"]}
  assert perceptual.assign_files(["lpips"], "a,b") == {"lpips": ["a", "b"]}
  for bad, msg in (("a", "names no network"), ("lpips=a", "no weight file for convnext_s"),
                   ("lpips=a,clip=b", "'clip', which"), ("", "needs"),
                   ("lpips=a,convnext_s=d", "perceptual_path: d does not exist")):
    with pytest.raises(UserError, match=msg):
      perceptual.assign_files(names, bad)


def test_combined_term_is_the_references_weighted_average(fixture, tmp_path, monkeypatch):
  """lpips-convnext_s-1.0-0.1 = (LPIPS + 0.1 ConvNeXt) / 1.1, weights read from NAME=FILE
  files (the tiny ConvNeXt stands in for convnext_small, whose 50 M weights a test need not
  draw)."""
  with np.load(os.path.join(HERE, "lpips_parity.npz")) as f:
    lp_sd = lpips_fixture.synthetic_state_dict(lpips_fixture.spec_of(f))
  cn_sd, cn_params = _tiny_params(fixture)
  np.savez(tmp_path / "lpips.npz", **lp_sd)
  np.savez(tmp_path / "convnext.npz", **cn_sd)
  monkeypatch.setattr(cn, "ConvNeXt", functools.partial(
      cn.ConvNeXt, depths=fx.TINY["depths"], dims=fx.TINY["dims"],
      num_classes=fx.TINY["num_classes"]))
  part, loss, digest = perceptual.build(
      "lpips-convnext_s-1.0-0.1",
      f"lpips={tmp_path}/lpips.npz,convnext_s={tmp_path}/convnext.npz")
  params = part.load()
  assert set(params) == {"lpips", "convnext_s"} and len(digest) == 64
  x, y = lpips_fixture.pairs()
  got = float(jax.jit(loss)(params, x, y))
  lp = np.asarray(lpips.LPIPS().apply({"params": lpips.params_from_state_dict(lp_sd)}, x, y))
  cv = float(cn.logit_mse(_tiny(), cn_params, x, y))
  assert lp.mean() > 0 and cv > 0
  assert got == pytest.approx((lp.mean() + 0.1 * cv) / 1.1, rel=1e-5)
  shapes = jax.eval_shape(part.init, jax.random.key(0), {"image": jnp.asarray(x)})
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, params)
