"""`flowtok eval --inception`: FID / rFID / caption scores of a bundle on real (folder) data."""
import dataclasses
import json
import os

import inception_fixture as fx
import numpy as np
import PIL.Image
import pytest
import tiny_bundle
from cli_run import assert_one_error, run_cli

from flowtok_jax import inference
from flowtok_jax.data import builders
from flowtok_jax.evaluation import image_metrics, inception, real_eval, run_eval

CAPTIONS = ["a red circle", "a small blue square", "a large green triangle",
            "a yellow circle in the center", "a red square above a blue circle",
            "a cyan triangle", "a purple square at the top left", "a big white circle"]


@pytest.fixture(scope="module")
def folder_bundle(tiny_bundle_dir, tmp_path_factory):
  """The tiny bundle, its data section pointed at a built folder of captioned photos-to-be."""
  root = tmp_path_factory.mktemp("real")
  folder = root / "photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  rows = []
  for i, caption in enumerate(CAPTIONS):  # Sizes other than the model's: resized and cropped.
    PIL.Image.fromarray(rng.integers(0, 256, (48 + 4 * i, 80, 3), dtype=np.uint8)).save(
        folder / f"p{i}.png")
    rows.append({"file": f"p{i}.png", "caption": caption})
  (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  b = inference.load_bundle(tiny_bundle_dir)
  config = b.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.name = builders.FOLDER_NAME
    config.data.folder = str(folder)
    config.data.folder_val_fraction = 0.5
    config.data.i2t_caption_key = None
  data_dir = str(root / "data")
  builders.build(config.data, data_dir)
  weights = root / "inception.npz"
  with np.load(os.path.join(os.path.dirname(__file__), "inception_parity.npz")) as f:
    np.savez(weights, **fx.synthetic_state_dict(fx.spec_of(f)))
  return dataclasses.replace(b, config=config), data_dir, str(weights)


def test_an_oracle_scores_perfectly_and_a_model_is_measured(folder_bundle, monkeypatch, tmp_path):
  bundle, data_dir, weights = folder_bundle
  images, captions = real_eval.load_examples(bundle.config.data, data_dir, "val",
                                             bundle.models.image_size)
  assert len(images) == 4 and all(c[0] in CAPTIONS for c in captions)
  by_caption = {c[0]: im for im, c in zip(images, captions)}
  by_image = {im.tobytes(): c[0] for im, c in zip(images, captions)}
  with monkeypatch.context() as m:
    m.setattr(inference.Generator, "generate",
              lambda self, prompts, seeds, truncate=False: np.stack([by_caption[p]
                                                                     for p in prompts]))
    m.setattr(inference.Captioner, "caption_images",
              lambda self, ims: [by_image[im.tobytes()] for im in ims])
    m.setattr(run_eval, "reconstruct",
              lambda b, ims, *a, **k: (ims.copy(), np.full(len(ims), 0.2)))
    result = real_eval.evaluate_real(bundle, data_dir, weights, out=str(tmp_path / "oracle"),
                                     compiler_options=tiny_bundle.FAST_COMPILE)
  s = result["summary"]
  assert s["val/num"] == 4 and result["split"] == "val"
  assert s["tokenizer/val/rfid"] == pytest.approx(0.0, abs=1e-3)
  assert s["t2i/val/fid"] == pytest.approx(0.0, abs=1e-3)
  assert s["i2t/val/bleu4"] == pytest.approx(1.0) and s["i2t/val/cider_d"] > 1.0
  assert s["tokenizer/val/ssim"] == pytest.approx(1.0)
  assert s["tokenizer/val/posterior_std"] == pytest.approx(0.2)
  for name in ("eval.json", "report.html", "grids.npz"):
    assert os.path.exists(tmp_path / "oracle" / name)

  # The untrained tiny model through the real servers: its FIDs are the Inception's own.
  out = tmp_path / "model"
  result = real_eval.evaluate_real(bundle, data_dir, weights, num=3, out=str(out), seed=5,
                                   compiler_options=tiny_bundle.FAST_COMPILE)
  s = result["summary"]
  assert s["val/num"] == 3
  net = inception.InceptionFeatures(inception.load_variables(weights))
  generated = inference.Generator(bundle, compiler_options=tiny_bundle.FAST_COMPILE).generate(
      [c[0] for c in captions[:3]], [5, 6, 7], truncate=True)
  want = image_metrics.frechet_distance_features(net(images[:3]), net(generated))
  assert s["t2i/val/fid"] == pytest.approx(want, rel=1e-3) and want > 0
  assert s["tokenizer/val/rfid"] > 0 and 0 <= s["i2t/val/bleu4"] <= 1
  assert json.load(open(out / "eval.json"))["summary"]["t2i/val/fid"] == pytest.approx(want,
                                                                                        rel=1e-3)


def test_refusals(folder_bundle, tiny_bundle_dir, shapes_data_dir, tmp_path, capsys):
  bundle, data_dir, weights = folder_bundle
  with pytest.raises(Exception, match="never reads the training split"):
    real_eval.evaluate_real(bundle, data_dir, weights, split="train", out=str(tmp_path / "a"))
  with pytest.raises(Exception, match="needs --num 2"):
    real_eval.evaluate_real(bundle, data_dir, weights, num=1, out=str(tmp_path / "b"))
  with pytest.raises(Exception, match="does not exist"):
    real_eval.evaluate_real(bundle, data_dir, str(tmp_path / "none.pth"), out=str(tmp_path / "c"))
  with pytest.raises(Exception, match="not captioned-shapes: measure it by FID with --inception"):
    run_eval.evaluate(bundle, data_dir, out=str(tmp_path / "d"))
  code, _, err = run_cli(["eval", "--bundle", tiny_bundle_dir, "--data_dir", shapes_data_dir[1],
                          "--inception", weights, "--out", str(tmp_path / "e")], capsys)
  assert_one_error(code, err, "--inception (real FID) is for real data")
  assert not os.path.exists(tmp_path / "e")
