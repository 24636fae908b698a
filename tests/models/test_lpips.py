"""LPIPS: parity with the `lpips` package (a stored fixture), its weight map, and the tokenizer
stage's perceptual term reading the weights as a frozen part."""
import os

import jax
import jax.numpy as jnp
import lpips_fixture as fx
import numpy as np
import pytest

from flowtok_jax import config_lib, sharding
from flowtok_jax.errors import UserError
from flowtok_jax.models import lpips
from flowtok_jax.train import loop, stage_api

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(os.path.dirname(os.path.dirname(HERE)), "configs", "demo.py")


@pytest.fixture(scope="module")
def state_dict():
  with np.load(os.path.join(HERE, "lpips_parity.npz")) as f:
    return fx.synthetic_state_dict(fx.spec_of(f)), f["distances"]


def test_distances_match_the_lpips_package(state_dict):
  sd, want = state_dict
  x, y = fx.pairs()
  got = np.asarray(jax.jit(lpips.LPIPS().apply)({"params": lpips.params_from_state_dict(sd)},
                                                x, y))
  assert want[0] > 0.01 and want[-1] == 0.0  # Different pairs, then one image twice.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * want.max())


def test_weight_files_in_both_namings(state_dict):
  """torchvision's VGG16 (`features.N`, with its classifier) + the heads file, or one LPIPS state
  dict (`net.sliceK.N`, `lins.K` aliases, scaling buffers): the same params."""
  sd, _ = state_dict
  ours = lpips.params_from_state_dict(sd)
  torchvision = {}
  for k, v in sd.items():
    if k.startswith("net."):
      _, _, n, leaf = k.split(".")
      torchvision[f"features.{n}.{leaf}"] = v
  torchvision["classifier.0.weight"] = np.zeros((4, 3), np.float32)
  heads = {k: v for k, v in sd.items() if k.startswith("lin")}
  split = lpips.params_from_state_dict({**torchvision, **heads})
  assert jax.tree.all(jax.tree.map(np.array_equal, ours, split))
  aliased = dict(sd, **{f"lins.{k}.model.1.weight": sd[f"lin{k}.model.1.weight"]
                        for k in range(5)}, **{"scaling_layer.shift": np.zeros((1, 3, 1, 1))})
  assert jax.tree.all(jax.tree.map(np.array_equal, ours, lpips.params_from_state_dict(aliased)))
  np.testing.assert_array_equal(ours["features_28"]["kernel"],
                                sd["net.slice5.28.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(UserError, match="missing 'lin0.model.1.weight'"):
    lpips.params_from_state_dict(torchvision)
  with pytest.raises(UserError, match=r"'features.0.weight' has shape \(64, 3, 5, 5\)"):
    lpips.params_from_state_dict({**torchvision, **heads,
                                  "features.0.weight": np.zeros((64, 3, 5, 5), np.float32)})
  with pytest.raises(UserError, match="unexpected key 'fc.weight'"):
    lpips.params_from_state_dict({**torchvision, **heads, "fc.weight": np.zeros(3)})


def _tokenizer_config(**stage):
  config = stage_api.config_for_stage(config_lib.load(DEMO + ":runlocal,res=32"), "tokenizer")
  config.tokenizer_stage.update(stage)
  return config


def test_tokenizer_stage_adds_lpips_from_weight_files(state_dict, tmp_path):
  sd, _ = state_dict
  vgg, heads = tmp_path / "vgg16.npz", tmp_path / "heads.npz"
  np.savez(vgg, **{k: v for k, v in sd.items() if k.startswith("net.")})
  np.savez(heads, **{k: v for k, v in sd.items() if k.startswith("lin")})
  config = _tokenizer_config(perceptual="lpips", perceptual_weight=2.0,
                             perceptual_path=f"{vgg},{heads}")
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.get("sharding"))
  ctx = stage_api.StageContext(mesh=mesh, rules=rules, workdir=str(tmp_path), process_index=0,
                               process_count=1, global_batch_size=4, seed=0)
  stage = stage_api.get_builder("tokenizer")(config, ctx)
  assert [p.name for p in stage.frozen][-1] == "perceptual"
  # Checkpoints record the weight files' content: other weights under the same names differ.
  recorded = stage.fingerprints["perceptual"]
  np.savez(heads, **{k: 2 * v for k, v in sd.items() if k.startswith("lin")})
  changed = stage_api.get_builder("tokenizer")(config, ctx).fingerprints
  assert changed["perceptual"] != recorded
  assert loop.fingerprint_clash(changed, {"fingerprints": stage.fingerprints}).startswith(
      "perceptual: sha256")
  np.savez(heads, **{k: v for k, v in sd.items() if k.startswith("lin")})
  batch1 = loop.example_batch_1(stage)
  frozen, _, _ = loop.load_frozen(stage, batch1, mesh, rules, seed=0)
  np.testing.assert_array_equal(np.asarray(frozen["perceptual"]["lpips"]["lin0"]["kernel"]),
                                sd["lin0.model.1.weight"].transpose(2, 3, 1, 0))
  params = sharding.strip_boxes(jax.jit(lambda r: loop.make_init_fn(stage, {
      k: jnp.asarray(v) for k, v in batch1.items()})(r))(jax.random.PRNGKey(0))).params
  rng = np.random.default_rng(0)
  size = config.tokenizer.image_size
  batch = {"image": rng.uniform(size=(4, size, size, 3)).astype(np.float32),
           "text_ids": np.tile(batch1["text_ids"], (4, 1))}
  total, aux = jax.jit(lambda p, f, b: stage.loss_fn(p, f, b, jax.random.PRNGKey(1), 0,
                                                     None)[:2])(params, frozen, batch)
  metrics = getattr(aux, "metrics", aux)
  p = float(metrics["perceptual_loss"])
  assert np.isfinite(p) and p > 0
  rest = float(metrics["recon_loss"]) + config.tokenizer_stage.kl_weight * float(metrics["kl"])
  assert float(total) == pytest.approx(rest + 2.0 * p, rel=1e-5)
  with pytest.raises(UserError, match="needs tokenizer_stage.perceptual_path"):
    stage_api.get_builder("tokenizer")(_tokenizer_config(perceptual="lpips",
                                                         perceptual_weight=1.0), ctx)
  with pytest.raises(UserError, match="does not exist"):
    stage_api.get_builder("tokenizer")(_tokenizer_config(
        perceptual="lpips", perceptual_weight=1.0, perceptual_path=f"{vgg},{tmp_path}/no.pth"), ctx)
