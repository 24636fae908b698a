"""`flowtok probe`: the path arithmetic on a bundle whose velocity is exactly zero, and refusals."""
import json

import jax
import numpy as np
import pytest

from flowtok_jax import cli, inference
from flowtok_jax.data import shapes
from flowtok_jax.evaluation import i2t_probe, shapes_eval


def test_probe_path_arithmetic_with_a_zero_velocity(tiny_bundle_dir, shapes_data_dir):
  """With the DiT's output layer zeroed (as adaLN-Zero initialises it) v = 0, so the one-step
  estimate is x_t itself, whose error falls as (1 − t)², and the ODE never leaves z_I."""
  data_cfg, data_dir = shapes_data_dir
  b = inference.load_bundle(tiny_bundle_dir)
  b.params["flow"]["final_layer"]["linear"] = jax.tree.map(
      np.zeros_like, b.params["flow"]["final_layer"]["linear"])
  out = i2t_probe.probe(b, data_dir, num=4, steps=2)
  r0 = out["onestep/t=0/rel_err"]
  assert r0 > 0.1
  for t in i2t_probe.DEFAULT_TIMES:
    np.testing.assert_allclose(out[f"onestep/t={t:g}/rel_err"], (1 - t) ** 2 * r0, rtol=1e-3)
  np.testing.assert_allclose(out["ode/rel_err"], r0, rtol=1e-5)
  # The run trained I2T towards the reference captions (data.i2t_caption_key).
  _, attrs, captions = shapes_eval.load_split(data_cfg, data_dir, "test", 4)
  assert i2t_probe.target_captions(b, attrs, captions) == [
      shapes.reference_caption(a["objects"], a["relation"]) for a in attrs]


def test_probe_cli_prints_one_json_object(tiny_bundle_dir, shapes_data_dir, capsys):
  _, data_dir = shapes_data_dir
  cli.main(["probe", "--bundle", tiny_bundle_dir, "--data_dir", data_dir, "--num", "4",
            "--steps", "2"])
  out = json.loads(capsys.readouterr().out)
  assert out["num"] == 4 and out["steps"] == 2 and out["cfg_scale"] == 1.0
  assert {f"onestep/t={t:g}/exact" for t in i2t_probe.DEFAULT_TIMES} | {
      "text/blend_exact"} <= set(out)
  for key, value in out.items():
    assert np.isfinite(value), key
    if key.endswith("exact"):
      assert 0.0 <= value <= 1.0, key


def test_probe_refuses_the_training_split(tiny_bundle_dir, shapes_data_dir, capsys):
  _, data_dir = shapes_data_dir
  with pytest.raises(SystemExit) as e:
    cli.main(["probe", "--bundle", tiny_bundle_dir, "--data_dir", data_dir, "--split", "train"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "training split" in err[0]
  for split in ("train[:5]", "test,val"):  # Neither a slice of train nor a list gets through.
    with pytest.raises(SystemExit) as e:
      cli.main(["probe", "--direction", "t2i", "--bundle", tiny_bundle_dir, "--data_dir",
                data_dir, "--split", split])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "split" in err[0]
  with pytest.raises(SystemExit) as e:
    cli.main(["probe", "--bundle", tiny_bundle_dir, "--data_dir", data_dir, "--num", "0"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "--num" in err[0] and ">= 1" in err[0]


def test_t2i_probe_reads_like_the_t2i_bar(tiny_bundle_dir, shapes_data_dir, capsys):
  """`--direction t2i`: parser accuracies in [0, 1]; with the DiT's output zeroed (v = 0) the
  one-step error is x_t's, which falls as (1 − t)² towards the true tokens, and the ODE stays
  at z_T."""
  from flowtok_jax.evaluation import t2i_probe  # pylint: disable=g-import-not-at-top
  _, data_dir = shapes_data_dir
  cli.main(["probe", "--direction", "t2i", "--bundle", tiny_bundle_dir, "--data_dir", data_dir,
            "--num", "4", "--steps", "2"])
  out = json.loads(capsys.readouterr().out)
  assert out["num"] == 4 and out["steps"] == 2
  assert {"recon/accuracy", "ode/accuracy"} | {
      f"noise/sigma={s:g}/accuracy" for s in t2i_probe.DEFAULT_SIGMAS} <= set(out)
  for key, value in out.items():
    assert np.isfinite(value), key
    if key.endswith("accuracy"):
      assert 0.0 <= value <= 1.0, key
  b = inference.load_bundle(tiny_bundle_dir)
  b.params["flow"]["final_layer"]["linear"] = jax.tree.map(
      np.zeros_like, b.params["flow"]["final_layer"]["linear"])
  out = t2i_probe.probe(b, data_dir, num=4, steps=2, sigmas=())
  r0 = out["onestep/t=0/rel_err"]
  assert r0 > 0.1
  for t in t2i_probe.DEFAULT_TIMES:
    np.testing.assert_allclose(out[f"onestep/t={t:g}/rel_err"], (1 - t) ** 2 * r0, rtol=1e-3)
