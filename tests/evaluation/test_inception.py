"""Real FID: the FID Inception-v3 against pytorch-fid (stored fixture), its weights, `flowtok fid`.

The parity fixture (inception_fixture.py says how it was made) holds pytorch-fid 0.3.0's pool
features for a seeded state dict and seeded images; a wrong pooling quirk, BatchNorm epsilon or
resize moves the features by 2-30 % of their scale (measured when the fixture was made), the
implementation agrees to ~6e-7.
"""
import json
import os

import inception_fixture as fx
import numpy as np
import pytest
from cli_run import assert_one_error, run_cli
from PIL import Image

from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import image_metrics
from flowtok_jax.evaluation import inception as inc

FIXTURE = os.path.join(os.path.dirname(__file__), "inception_parity.npz")


@pytest.fixture(scope="module")
def fixture():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def state_dict(fixture):
  return fx.synthetic_state_dict(fx.spec_of(fixture))


@pytest.fixture(scope="module")
def net(state_dict):
  return inc.InceptionFeatures(inc.variables_from_state_dict(state_dict), batch_size=2)


def test_features_match_pytorch_fid(fixture, net):
  ours = np.concatenate([net(x) for x in fx.images()])  # 64 px (upsampled), 333 x 400 (shrunk).
  ref = fixture["features"]
  assert ours.shape == ref.shape == (3, inc.FEATURES)
  for i in range(len(ref)):
    scale = np.abs(ref[i]).max()
    assert scale > 1.0  # The seeded weights keep activations alive to the pool.
    np.testing.assert_allclose(ours[i], ref[i], rtol=0, atol=1e-4 * scale)


def test_uint8_images_are_scaled(net):
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  np.testing.assert_allclose(net(u8), net(u8.astype(np.float32) / 255.0), rtol=1e-6, atol=1e-6)


def test_resize_is_torch_bilinear_without_antialias(fixture):
  out = inc.resize(fx.resize_input()[0], fx.RESIZE_OUT)  # Down in W (40 -> 29), up in H.
  np.testing.assert_allclose(out, fixture["resized"][0], rtol=0, atol=1e-5)
  same = np.random.default_rng(0).uniform(size=(inc.INPUT_SIZE, inc.INPUT_SIZE, 3))
  np.testing.assert_array_equal(inc.resize(same), same.astype(np.float32))


def test_mixed_sizes_in_one_batch(net):
  rng = np.random.default_rng(1)
  ims = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((40, 40, 3), (24, 56, 3), (40, 40, 3))]
  together = net(ims)  # Three images, batch 2: one full batch and one padded.
  alone = np.concatenate([net([im]) for im in ims])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


def test_weight_map_takes_every_reference_key(fixture, state_dict):
  variables = inc.variables_from_state_dict(state_dict)
  abstract = inc.abstract_variables()
  flat = lambda t: {k: v.shape for k, v in _flatten(t).items()}
  assert flat(variables) == flat(abstract)
  # 94 conv + BN units: pool features use every state-dict entry except the classifier and the
  # BatchNorm step counters.
  used = sum(1 for _ in _flatten(variables))
  ignored = [k for k in state_dict if inc.ignored_key(k)]
  assert used + len(ignored) == len(state_dict) == len(fixture["keys"])
  assert sorted(k for k in ignored if not k.endswith("num_batches_tracked")) == ["fc.bias",
                                                                                 "fc.weight"]
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  np.testing.assert_array_equal(  # A 1x7 conv: OIHW [128, 128, 1, 7] -> HWIO [1, 7, 128, 128].
      kernel, state_dict["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"])


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def test_weight_map_refusals(state_dict):
  missing = {k: v for k, v in state_dict.items() if k != "Mixed_5b.branch1x1.bn.running_mean"}
  with pytest.raises(UserError, match=r"missing 'Mixed_5b.branch1x1.bn.running_mean'"):
    inc.variables_from_state_dict(missing, "w.pth")
  wrong = dict(state_dict, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
  with pytest.raises(UserError, match=r"'Conv2d_1a_3x3.conv.weight' has shape \(32, 3, 5, 5\)"):
    inc.variables_from_state_dict(wrong, "w.pth")
  extra = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(UserError, match=r"unexpected key 'AuxLogits.fc.weight'"):
    inc.variables_from_state_dict(extra, "w.pth")


def _write_images(folder, n, size, seed):
  os.makedirs(folder)
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(folder, f"{i:03d}.png"))


def test_fid_command(tmp_path, capsys, state_dict, net):
  """convert -> fid between folders -> statistics files -> the same number; and its refusals."""
  src = tmp_path / "inception.npz"
  np.savez(src, **state_dict)
  wdir = tmp_path / "inception"
  code, out, err = run_cli(["convert", "--kind", "inception", "--src", str(src), "--out",
                            str(wdir)], capsys)
  assert code == 0, err
  assert json.loads(out)["params"]["inception"] == 21785568  # Without the 1008-way classifier.
  a, b = tmp_path / "a", tmp_path / "b"
  _write_images(str(a), 3, (40, 40), seed=1)
  _write_images(str(b), 2, (40, 40), seed=2)
  # One image of another size in b; files pytorch-fid would not read are left out here too.
  Image.fromarray(np.full((24, 56, 3), 200, np.uint8)).save(b / "zz.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(b / "UPPER.PNG", format="PNG")
  (b / "notes.txt").write_text("not an image")

  code, out, err = run_cli(["fid", str(a), str(b), "--inception", str(wdir), "--batch_size",
                            "2"], capsys)
  assert code == 0, err
  result = json.loads(out)
  a_feats = net([inc.read_image(str(a / f"{i:03d}.png")) for i in range(3)])
  b_feats = net([inc.read_image(str(b / n)) for n in ("000.png", "001.png", "zz.png")])
  want = image_metrics.frechet_distance_features(a_feats, b_feats)
  assert result["num_images"] == [3, 3]
  assert result["fid"] == pytest.approx(want, rel=1e-4) and result["fid"] > 0

  stats = tmp_path / "stats" / "a.npz"
  code, out, err = run_cli(["fid", str(a), "--inception", str(src), "--save_stats",
                            str(stats), "--batch_size", "2"], capsys)
  assert code == 0, err
  mu, sigma = inc.load_stats(str(stats))
  np.testing.assert_allclose(mu, a_feats.mean(0), rtol=1e-5, atol=1e-5)
  code, out, err = run_cli(["fid", str(stats), str(b), "--inception", str(wdir),
                            "--batch_size", "2"], capsys)
  assert code == 0, err
  assert json.loads(out)["fid"] == pytest.approx(result["fid"], rel=1e-4)
  code, out, err = run_cli(["fid", str(stats), str(stats), "--inception", str(wdir)], capsys)
  assert json.loads(out)["fid"] == pytest.approx(0.0, abs=1e-3)
  code, _, err = run_cli(["fid", str(a), "--inception", str(src), "--save_stats", str(stats)],
                         capsys)
  assert_one_error(code, err, "exists")  # Statistics are never overwritten.

  empty, single = tmp_path / "empty", tmp_path / "single"
  empty.mkdir()
  _write_images(str(single), 1, (40, 40), seed=3)
  for argv, needles in (
      ([str(a), str(empty)], ("holds 0 image(s)",)),
      ([str(a), str(single)], ("holds 1 image(s)", "at least 2")),
      ([str(a), str(tmp_path / "nope")], ("not a directory of images",)),
      ([str(a)], ("--save_stats",)),
      ([str(a), str(b), str(a)], ("one source", "got 3")),
      ([str(stats), "--save_stats", str(tmp_path / "s.npz")], ("image folder",)),
      ([str(a), "--save_stats", str(tmp_path / "s.txt")], ("must end in .npz",)),
      ([str(a), str(src)], ("not a statistics file",)),
  ):
    code, _, err = run_cli(["fid", *argv, "--inception", str(wdir)], capsys)
    assert_one_error(code, err, *needles)
  code, _, err = run_cli(["fid", str(a), str(b), "--inception", str(tmp_path / "none.pth")],
                         capsys)
  assert_one_error(code, err, "does not exist")
  # A file that is no image: refused before the weights load or any image is computed.
  broken = tmp_path / "broken"
  _write_images(str(broken), 2, (40, 40), seed=5)
  (broken / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  code, _, err = run_cli(["fid", str(a), str(broken), "--inception", str(tmp_path / "none.pth")],
                         capsys)
  assert_one_error(code, err, "cannot read image", "zz.png")
  # Damaged weights: one line naming the flag or the file, never a traceback.
  bad_npz, not_ckpt = tmp_path / "bad.npz", tmp_path / "w.pth"
  bad_npz.write_bytes(b"PK\x03\x04 truncated")
  not_ckpt.write_text("not a checkpoint")
  with open(wdir / "inception.msgpack", "r+b") as f:
    f.truncate(1000)
  for weights, needle in ((bad_npz, "--inception"), (not_ckpt, "--inception"),
                          (wdir, "damaged")):
    code, _, err = run_cli(["fid", str(a), str(b), "--inception", str(weights)], capsys)
    assert_one_error(code, err, needle)
  code, _, err = run_cli(["convert", "--kind", "inception", "--src", str(src), "--out",
                          str(src / "sub")], capsys)
  assert_one_error(code, err, "--out", "is a file")
  code, _, err = run_cli(["convert", "--kind", "inception", "--config", "configs/demo.py",
                          "--src", str(src), "--out", str(tmp_path / "w2")], capsys)
  assert_one_error(code, err, "takes no --config")
  assert not os.path.exists(tmp_path / "w2")


def test_bench_fid_reports_rate_and_flops(capsys, monkeypatch):
  from flowtok_jax.tools import bench  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bench, "PEAK_MATMUL_SIZE_CPU", 512)  # A quicker peak measurement.
  code, out, err = run_cli(["bench", "fid", "--batch_size", "1", "--steps", "1",
                            "--image_size", "64"], capsys)
  assert code == 0, err
  r = json.loads(out.strip().splitlines()[-1])
  assert r["bench"] == "fid" and r["batch_size"] == 1 and r["image_size"] == 64
  assert r["network_images_per_sec"] == pytest.approx(1 / r["network_call_s"], abs=2e-3)
  assert 0 < r["images_per_sec"] <= r["network_images_per_sec"] and r["resize_ms_per_image"] > 0
  # Inception-v3 to its pool: ~5.5 GMAC per 299² image (XLA's count).
  assert 1.0e10 < r["flops_per_image"] < 1.2e10 and r["mfu"] > 0
  code, _, err = run_cli(["bench", "fid", "--config", "configs/demo.py"], capsys)
  assert_one_error(code, err, "takes no --config")
  code, _, err = run_cli(["bench", "train"], capsys)
  assert_one_error(code, err, "needs --config")


def test_threaded_decoding_gives_the_same_features(tmp_path, net):
  folder = tmp_path / "imgs"
  _write_images(str(folder), 5, (30, 44), seed=4)
  files = inc.list_images(str(folder))
  seen = []
  inline = inc.files_features(files, net, seen.append, workers=0)
  threaded = inc.files_features(files, net, workers=2)  # Batches of 2: two ahead, one short.
  np.testing.assert_array_equal(inline, threaded)
  assert seen == [2, 2, 1] and inline.shape == (5, inc.FEATURES)
