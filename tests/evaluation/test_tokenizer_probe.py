"""`flowtok probe --direction tokenizer`: per-object readings on rendered scenes, and the CLI."""
import json

import numpy as np
import pytest

from flowtok_jax import cli, inference
from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import run_eval, shapes_eval, tokenizer_probe

LEFT, RIGHT = [8, 8, 24, 24], [36, 36, 52, 52]


def _scene(*objects):
  return shapes.render_objects([dict(color=c, shape=s, bbox=b) for c, s, b in objects], 64)


def _readings(original, image):
  return tokenizer_probe.object_readings(np.stack([original]), np.stack([image]))


def test_a_faithful_image_reads_every_object_right():
  scene = _scene(("red", "square", LEFT), ("blue", "circle", RIGHT))
  out = _readings(scene, scene)
  assert out["objects/num"] == 2
  assert out["objects/shape"] == out["objects/color"] == 1.0 and out["objects/missing"] == 0.0
  assert not [k for k in out if k.startswith("confusion/")]
  assert out["two/other_shape_num"] == 0 and np.isnan(out["two/other_shape"])


def test_swapped_shapes_are_confusions_and_binding_slips():
  original = _scene(("red", "square", LEFT), ("blue", "circle", RIGHT))
  swapped = _scene(("red", "circle", LEFT), ("blue", "square", RIGHT))
  out = _readings(original, swapped)
  assert out["objects/shape"] == 0.0 and out["objects/color"] == 1.0
  assert out["confusion/square->circle"] == out["confusion/circle->square"] == 1
  assert out["two/other_shape_num"] == 2 and out["two/other_shape"] == 1.0
  # A third shape is a confusion but not the other object's shape; a wrong colour is counted
  # by position, not by colour.
  third = _scene(("green", "triangle", LEFT), ("blue", "circle", RIGHT))
  out = _readings(original, third)
  assert out["confusion/square->triangle"] == 1 and len(
      [k for k in out if k.startswith("confusion/")]) == 1
  assert out["objects/shape"] == out["objects/color"] == 0.5
  assert out["two/other_shape_num"] == 1 and out["two/other_shape"] == 0.0


def test_an_empty_image_misses_every_object_and_shapes_must_match():
  original = _scene(("red", "square", LEFT))
  out = _readings(original, np.zeros_like(original))
  assert out["objects/num"] == 1 and out["objects/missing"] == 1.0 and out["objects/shape"] == 0
  with pytest.raises(UserError, match="differ in shape"):
    tokenizer_probe.object_readings(np.stack([original]), np.stack([original] * 2))


def test_probe_cli_reads_the_bar_and_refuses_train(tiny_bundle_dir, shapes_data_dir, capsys):
  data_cfg, data_dir = shapes_data_dir
  cli.main(["probe", "--direction", "tokenizer", "--bundle", tiny_bundle_dir, "--data_dir",
            data_dir, "--num", "6"])
  out = json.loads(capsys.readouterr().out)
  assert out["num"] == 6 and out["objects/num"] >= 6
  for key in ("recon/accuracy", "objects/shape", "objects/color", "objects/missing",
              "caption=empty/accuracy", "caption=swap/objects/shape"):
    assert 0.0 <= out[key] <= 1.0, key
  assert np.isfinite(out["recon/psnr"])
  # The default split is val, the tokenizer bar's, and the reading is the bar's own.
  b = inference.load_bundle(tiny_bundle_dir)
  images, attrs, captions = shapes_eval.load_split(data_cfg, data_dir, "val", 6)
  recon, _ = run_eval.reconstruct(b, images, captions)
  assert out["recon/accuracy"] == shapes_eval.t2i_accuracy(recon, attrs)["accuracy"]
  with pytest.raises(SystemExit) as e:
    cli.main(["probe", "--direction", "tokenizer", "--bundle", tiny_bundle_dir, "--data_dir",
              data_dir, "--split", "train"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "training split" in err[0]
