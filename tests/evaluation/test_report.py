"""The HTML report: page, image PNGs, metric values, stage times and loss-curve PNGs."""
import os
import re

import numpy as np
import PIL.Image
import pytest

from flowtok_jax.errors import UserError
from flowtok_jax.evaluation import report


def _grid(n, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_report_has_everything(tmp_path):
  path = str(tmp_path / "report.html")
  images = _grid(3)
  metrics = {"t2i": {"accuracy": 0.8765432, "color": 1.0}, "i2t/bleu4": 0.123456,
             "parser_val": float("nan"), "steps": 1500}
  curves = {"train/loss": [(s, 10.0 * 0.9 ** s) for s in range(0, 60, 5)],
            "eval/psnr": [(0, 12.0), (100, 20.5)], "one point": [(3, 1.0)],
            "broken": [(0, float("nan"))]}
  out = report.write_report(
      path, metrics,
      grids=[("T2I: prompts", images, ["a red <circle> & co", "b", "c"]),
             ("I2T: captions", images[:2], ["x", "y"])],
      stage_times={"tokenizer": 61.25, "flowtok": 100.0}, loss_curves=curves)
  assert out == path
  page = open(path, encoding="utf-8").read()
  # Metric values, flattened names, NaN shown as n/a.
  for text in ("t2i/accuracy", "0.8765", "i2t/bleu4", "0.1235", "n/a", "1500"):
    assert text in page, text
  # Stage times and their total.
  for text in ("tokenizer", "61.2", "flowtok", "161.2"):
    assert text in page, text
  # Texts beside their images, HTML-escaped.
  assert "a red &lt;circle&gt; &amp; co" in page and "<circle>" not in page
  srcs = re.findall(r"<img src='([^']+)'", page)
  assert len(srcs) == 3 + 2 + len(curves)
  for src in srcs:
    assert os.path.isfile(os.path.join(tmp_path, src)), src
  # Sample PNGs keep their exact pixels.
  first = np.asarray(PIL.Image.open(os.path.join(tmp_path, srcs[0])))
  np.testing.assert_array_equal(first, images[0])
  # Curves are real pictures with some blue line drawn.
  curve = np.asarray(PIL.Image.open(os.path.join(tmp_path, srcs[5])).convert("RGB"))
  blue = np.abs(curve.astype(int) - (30, 90, 200)).sum(-1) < 10
  assert curve.shape[0] > 100 and blue.sum() > 50


def test_curve_switches_to_log_scale_for_wide_ranges(tmp_path):
  out = report.draw_curve([(s, 10.0 ** -s) for s in range(5)], "loss", str(tmp_path / "c.png"))
  assert PIL.Image.open(out).size == (480, 260)


def test_report_rejects_mismatched_texts(tmp_path):
  with pytest.raises(UserError, match="texts"):
    report.write_report(str(tmp_path / "r.html"), {}, grids=[("g", _grid(2), ["only one"])])


def test_float_images_are_converted(tmp_path):
  path = report.write_report(str(tmp_path / "r.html"), {"a": 1},
                             grids=[("g", np.full((1, 16, 16, 3), 0.5, np.float32), ["t"])])
  files = os.listdir(tmp_path / "r_files")
  (png,) = files
  assert np.asarray(PIL.Image.open(tmp_path / "r_files" / png)).max() == 128
  assert os.path.isfile(path)


def test_a_void_t2i_accuracy_is_marked(tmp_path):
  path = str(tmp_path / "r.html")
  metrics = {"eval/t2i/test/accuracy": 0.5, "eval/t2i/test/accuracy_lenient": 0.6,
             "eval/t2i/test/valid": 0.0, "eval/t2i/compositional/accuracy": 0.25,
             "eval/t2i/compositional/valid": 1.0}
  page = open(report.write_report(path, metrics), encoding="utf-8").read()
  assert "void (0.5: the parser misreads the ground truth)" in page
  assert "void (0.6:" in page
  assert "<td class=num>0.25</td>" in page  # A valid split's number is shown as it is.
