"""`flowtok eval`: wiring (a perfect model scores perfectly), files written, bad splits refused."""
import hashlib
import inspect
import json
import os
import shutil

import numpy as np
import pytest
import tiny_bundle

from flowtok_jax import cli
from flowtok_jax import export
from flowtok_jax import inference
from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import image_metrics, run_eval, shapes_eval
from tests.cli_run import assert_one_error, run_cli

FAST = tiny_bundle.FAST_COMPILE
NUM = 4


def _key(image) -> str:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture
def oracle(shapes_data_dir, monkeypatch):
  """Servers replaced by an oracle (seed 7 first): the true image of a prompt, the true caption
  of an image, the image itself as its reconstruction. Returns the sizes of their calls."""
  data_cfg, data_dir = shapes_data_dir
  truth = {}  # (caption, index) -> image, image -> caption, over both evaluated splits.
  for split in ("test", "compositional", "val"):
    images, _, captions = shapes_eval.load_split(data_cfg, data_dir, split, NUM)
    for i, (image, caption) in enumerate(zip(images, captions)):
      truth[(caption, i)] = image
      truth[_key(image)] = caption
  calls = {"generate": [], "caption": [], "reconstruct": []}

  def generate(self, prompts, seeds, truncate=False):
    del self, truncate
    calls["generate"].append(len(prompts))
    return np.stack([truth[(p, s - 7)] for p, s in zip(prompts, seeds)])

  def caption_images(self, images):
    del self
    calls["caption"].append(len(images))
    return [truth[_key(im)] for im in images]

  def reconstruct(b, images, *a, **k):
    del b, a, k
    calls["reconstruct"].append(len(images))
    return images.copy(), np.full(len(images), 0.1)

  monkeypatch.setattr(inference.Generator, "generate", generate)
  monkeypatch.setattr(inference.Captioner, "caption_images", caption_images)
  monkeypatch.setattr(run_eval, "reconstruct", reconstruct)
  return calls


def test_perfect_model_scores_perfectly(tiny_bundle_dir, shapes_data_dir, oracle, monkeypatch,
                                        tmp_path):
  """Servers replaced by an oracle: every metric must then be at its best value."""
  _, data_dir = shapes_data_dir

  class PooledFeatures:
    """Stands in for the trained shapes net (H7's tests cover it): 8x8-pooled colours."""
    val_accuracy = {"both": 1.0}

    def frechet(self, a, b):
      pool = lambda x: x.reshape(len(x), 8, 8, 8, 8, 3).mean((2, 4)).reshape(len(x), -1)
      return image_metrics.frechet_distance_features(pool(a / 255.0), pool(b / 255.0))

  def feature_net_for(*args, **kwargs):
    inspect.signature(real_feature_net_for).bind(*args, **kwargs)  # Called as the real one.
    return PooledFeatures()

  real_feature_net_for = image_metrics.feature_net_for
  monkeypatch.setattr(image_metrics, "feature_net_for", feature_net_for)
  result = run_eval.evaluate(tiny_bundle_dir, data_dir, num=NUM, out=str(tmp_path), seed=7,
                             frechet_steps=2)
  s = result["summary"]
  for split in ("test", "compositional"):
    assert s[f"t2i/{split}/parser_gt"] == 1.0
    assert s[f"t2i/{split}/accuracy"] == 1.0 and s[f"t2i/{split}/valid"] == 1.0
    assert s[f"i2t/{split}/exact"] == 1.0 and s[f"i2t/{split}/parse_rate"] == 1.0
    # By scene kind (NaN, stored as null, where the split's first few hold none of a kind).
    for key in (f"t2i/{split}/accuracy_one", f"t2i/{split}/accuracy_two",
                f"i2t/{split}/exact_one", f"i2t/{split}/exact_two"):
      assert s[key] in (1.0, None), key
    assert s[f"i2t/{split}/bleu4"] == pytest.approx(1.0)
    assert s[f"i2t/{split}/cider_d"] > 1.0
    assert result["splits"][split]["num"] == NUM
    # Generated = true images: the Fréchet distance (shapes feature net) vanishes.
    assert abs(s[f"t2i/{split}/frechet_shapes_net"]) < 1e-3
  assert s["tokenizer/val/ssim"] == pytest.approx(1.0)
  assert s["tokenizer/val/psnr"] is None  # Identical images: infinite PSNR, stored as null.
  assert s["tokenizer/val/parser_recon"] == s["tokenizer/val/parser_gt"] == 1.0
  assert s["tokenizer/val/parser_recon_lenient"] == 1.0
  assert {s["tokenizer/val/parser_recon_one"], s["tokenizer/val/parser_recon_two"]} <= {1.0, None}
  assert s["tokenizer/val/posterior_std"] == pytest.approx(0.1)


def test_t2i_num_generates_for_fewer_prompts_and_reads_every_image(
    tiny_bundle_dir, shapes_data_dir, oracle, tmp_path):
  """--t2i_num: T2I on the first prompts only; I2T and the reconstructions read all `num`."""
  _, data_dir = shapes_data_dir
  result = run_eval.evaluate(tiny_bundle_dir, data_dir, num=NUM, t2i_num=2, out=str(tmp_path),
                             seed=7, frechet_steps=0)
  s = result["summary"]
  assert oracle == {"generate": [2, 2], "caption": [NUM, NUM], "reconstruct": [NUM]}
  for split in ("test", "compositional"):
    assert (s[f"t2i/{split}/num"], s[f"i2t/{split}/num"]) == (2, NUM)
    assert result["splits"][split]["t2i_num"] == 2 and result["splits"][split]["num"] == NUM
    assert s[f"t2i/{split}/accuracy"] == s[f"i2t/{split}/exact"] == 1.0
  assert s["tokenizer/val/num"] == NUM
  # The first grid shows the prompts generated for, not the ones skipped.
  assert len(run_eval.load_grids(str(tmp_path))[0][2]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--t2i_num", "0"], "--t2i_num"),
    (["--t2i_num", "1"], "the Fréchet distance needs --num and --t2i_num 2 or more"),
    (["--t2i_num", "2", "--inception", "missing.pth"], "--t2i_num is for captioned-shapes"),
])
def test_eval_refuses_a_bad_t2i_num(tiny_bundle_dir, shapes_data_dir, flags, message, capsys):
  _, data_dir = shapes_data_dir
  code, _, err = run_cli(["eval", "--bundle", tiny_bundle_dir, "--data_dir", data_dir,
                          "--num", "2", *flags], capsys)
  assert_one_error(code, err, message)


def test_eval_cli_writes_json_report_and_grids(tiny_bundle_dir, shapes_data_dir, monkeypatch,
                                               tmp_path, capsys):
  monkeypatch.setattr(inference, "DEFAULT_COMPILER_OPTIONS", FAST)
  data_cfg, data_dir = shapes_data_dir
  bundle = tmp_path / "bundle"
  shutil.copytree(tiny_bundle_dir, bundle)
  code = cli.main(["eval", "--bundle", str(bundle), "--data_dir", data_dir, "--split",
                   "test", "--num", str(NUM), "--batch_size", "3", "--frechet_steps", "0"])
  stdout, stderr = capsys.readouterr()
  assert code == 0
  # Progress with an ETA over every image generated, captioned and reconstructed (whole lines
  # off a terminal: the first batch and the end).
  lines = [l for l in stderr.splitlines() if l.startswith("eval: ")]
  assert lines and f"100% {3 * NUM}/{3 * NUM} [" in lines[-1] and "image/s" in lines[-1], stderr
  # Without --out it writes beside the bundle, not into it: a later re-export (which replaces
  # the bundle directory whole and refuses to delete files it does not own) is not blocked.
  out = tmp_path / "bundle-eval"
  assert sorted(os.listdir(tmp_path)) == ["bundle", "bundle-eval"]
  assert export._prepare_out(str(bundle)) == str(bundle)
  summary = json.loads(stdout.strip().splitlines()[-1])
  result = json.loads((out / "eval.json").read_text())
  assert result["summary"] == summary
  for key in ("t2i/test/accuracy", "i2t/test/exact", "i2t/test/bleu4", "i2t/test/cider_d",
              "tokenizer/val/psnr", "tokenizer/val/ssim", "tokenizer/val/parser_recon"):
    assert 0.0 <= summary[key] < 100.0, key
  assert summary["t2i/test/parser_gt"] == 1.0
  assert summary["tokenizer/val/posterior_std"] > 0.0  # Posterior statistics (DESIGN §7).
  assert 0.0 <= summary["tokenizer/val/parser_recon_lenient"] <= 1.0
  assert "t2i/test/frechet_shapes_net" not in summary  # --frechet_steps 0
  assert not any(k.startswith(("t2i/compositional", "t2i/train")) for k in summary)
  # The grid holds exactly what the Generator makes from those prompts and seeds.
  grids = run_eval.load_grids(str(out))
  _, _, captions = shapes_eval.load_split(data_cfg, data_dir, "test", NUM)
  title, images, texts = grids[0]
  assert "T2I test" in title and texts == captions
  again = inference.Generator(tiny_bundle_dir, batch_size=3).generate(captions[:1], [0])
  assert np.abs(again[0].astype(int) - images[0]).max() <= 1
  assert [t.startswith("I2T") or t.startswith("tokenizer") for t, _, _ in grids[1:]] == [1, 1]
  page = (out / "report.html").read_text()
  assert captions[0] in page and page.count("<img") >= 3 * NUM


def test_eval_refuses_the_training_split(tiny_bundle_dir, shapes_data_dir, capsys):
  _, data_dir = shapes_data_dir
  with pytest.raises(SystemExit) as e:
    cli.main(["eval", "--bundle", tiny_bundle_dir, "--data_dir", data_dir, "--split",
              "test,train"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "never reads the training split" in err[0]
  assert not os.path.exists(run_eval.default_out(tiny_bundle_dir))


def test_select_i2t_steps_picks_the_best_on_val_and_ties_to_fewer(tiny_bundle_dir,
                                                                  shapes_data_dir, monkeypatch):
  data_cfg, data_dir = shapes_data_dir
  images, _, captions = shapes_eval.load_split(data_cfg, data_dir, "val", NUM)
  truth = {_key(im): c for im, c in zip(images, captions)}
  right = {1: 1, 2: 3, 4: 3, 8: 2}  # Captions a captioner of k steps gets right (of NUM = 4).
  seen = []

  def caption_images(self, ims):
    seen.append(self.steps)
    return [truth[_key(im)] if i < right[self.steps] else "a" for i, im in enumerate(ims)]

  monkeypatch.setattr(inference.Captioner, "caption_images", caption_images)
  best, exact = run_eval.select_i2t_steps(tiny_bundle_dir, data_dir, (8, 4, 2, 1, 2),
                                          num=NUM, compiler_options=FAST)
  assert seen == [1, 2, 4, 8]
  assert exact == {1: 0.25, 2: 0.75, 4: 0.75, 8: 0.5} and best == 2
  with pytest.raises(UserError, match="held-out split"):
    run_eval.select_i2t_steps(tiny_bundle_dir, data_dir, (1,), split="train")
  with pytest.raises(UserError, match="positive"):
    run_eval.select_i2t_steps(tiny_bundle_dir, data_dir, (0, 1))
  with pytest.raises(UserError, match="positive"):
    run_eval.select_i2t_steps(tiny_bundle_dir, data_dir, (1.5, "2"))
  # No caption right at any count: no evidence, the bundle's default stays.
  right.update({1: 0, 2: 0, 4: 0, 8: 0})
  best, exact = run_eval.select_i2t_steps(tiny_bundle_dir, data_dir, (1, 8), num=NUM,
                                          compiler_options=FAST)
  assert set(exact.values()) == {0.0} and best == inference.load_bundle(
      tiny_bundle_dir).meta["defaults"]["i2t"]["steps"]


def test_eval_refuses_a_mistyped_data_dir(tiny_bundle_dir, shapes_data_dir, tmp_path, capsys):
  # A path that does not exist, or one level too deep, would otherwise get a new dataset built.
  _, data_dir = shapes_data_dir
  for bad, needle in ((str(tmp_path / "dat"), "does not exist"),
                      (os.path.join(data_dir, "captioned_shapes"), "inside the TFDS data dir")):
    code, _, err = run_cli(["eval", "--bundle", tiny_bundle_dir, "--data_dir", bad,
                            "--out", str(tmp_path / "e")], capsys)
    assert_one_error(code, err, needle)
    assert not os.path.exists(bad) or bad.startswith(data_dir)
  assert os.listdir(tmp_path) == []
