"""TFDS builders: captioned_shapes round trip, config naming, image folders, `flowtok data`."""
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
import PIL.Image
import pytest

from flowtok_jax import cli
from flowtok_jax.data import builders
from flowtok_jax.data import shapes
from flowtok_jax.errors import UserError
from cli_run import assert_one_error, run_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO_ROOT, "configs", "demo.py")


def _data_cfg(base, **overrides):
  cfg = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def test_shapes_source_is_pixel_exact_render(shapes_data_dir):
  data_cfg, data_dir = shapes_data_dir
  render_cfg = builders.shapes_config_from_data(data_cfg).render_config
  sizes = {"train": 256, "val": 64, "test": 64, "compositional": 64}
  for split, num in sizes.items():
    src = builders.data_source(data_cfg, split, data_dir)
    assert len(src) == num
    for i in (0, 1, num // 2, num - 1):
      ex = src[i]
      want = shapes.render_example(data_cfg.shapes.seed, split, i, render_cfg)
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == (64, 64, 3)
      np.testing.assert_array_equal(ex["image"], want["image"])
      assert ex["caption"].decode() == want["caption"]
      assert json.loads(ex["objects"]) == want["objects"]
      assert ex["relation"].decode() == want["relation"]
      assert ex["reference_caption"].decode() == shapes.reference_caption(want["objects"],
                                                                          want["relation"])


def test_config_name_follows_the_knobs_and_variants_coexist(shapes_data_dir):
  data_cfg, data_dir = shapes_data_dir
  name = builders.shapes_config_from_data(data_cfg).name
  assert name == builders.shapes_config_from_data(_data_cfg(data_cfg)).name
  for key, value in (("image_size", 32), ("shapes.num_train", 16), ("shapes.seed", 1),
                     ("shapes.paraphrase_prob", 0.0), ("shapes.heldout", ("red circle",))):
    assert builders.shapes_config_from_data(_data_cfg(data_cfg, **{key: value})).name != name, key
  small = _data_cfg(data_cfg, image_size=32, **{"shapes.num_train": 8, "shapes.num_val": 4,
                                                "shapes.num_test": 0,
                                                "shapes.num_compositional": 0})
  summary = builders.build(small, data_dir)
  assert "train=8 val=4" in summary and "test=" not in summary
  assert builders.data_source(small, "train", data_dir)[0]["image"].shape == (32, 32, 3)
  assert builders.data_source(data_cfg, "train", data_dir)[0]["image"].shape == (64, 64, 3)
  assert "already built" in builders.build(data_cfg, data_dir)
  with pytest.raises(UserError, match="no split 'test'"):
    builders.data_source(small, "test", data_dir)


def test_missing_datasets_and_bad_keys_are_user_errors(shapes_data_dir, tmp_path, monkeypatch,
                                                        capsys):
  data_cfg, data_dir = shapes_data_dir
  # A builder for an unprepared directory does not look for (or make a temporary directory
  # for) metadata on the TFDS bucket: ours are built locally.
  made = []
  monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(a) or str(tmp_path))
  with pytest.raises(UserError, match="flowtok data build"):
    builders.data_source(data_cfg, "train", str(tmp_path))
  assert not made
  monkeypatch.undo()
  other = _data_cfg(data_cfg, name="no_such_dataset_xyz")
  for fn in (lambda: builders.data_source(other, "train", str(tmp_path)),
             lambda: builders.build(other, str(tmp_path))):
    with pytest.raises(UserError, match="tfds build no_such_dataset_xyz --file_format=array_rec"):
      fn()
  # A TFDS dataset whose code needs TensorFlow (not installed here): one line that says where to
  # prepare it, and no TFDS banner on the way.
  if importlib.util.find_spec("tensorflow") is None:  # The project never installs it.
    coco = _data_cfg(data_cfg, name="coco_captions")
    with pytest.raises(UserError, match="in an environment with TensorFlow"):
      builders.data_source(coco, "train", str(tmp_path))
    assert "Failed to import TensorFlow" not in capsys.readouterr().out
  with pytest.raises(UserError, match="caption_key='text'"):
    builders.data_source(_data_cfg(data_cfg, caption_key="text"), "train", data_dir)
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(UserError, match="is a file; give a directory"):
    builders.build(data_cfg, str(a_file))
  for out in (str(tmp_path), str(tmp_path / "grid.txt")):
    with pytest.raises(UserError, match="must be a .png file path"):
      builders.write_preview(data_cfg, data_dir, out=out)


def _write_png(path, array):
  PIL.Image.fromarray(array).save(path)


@pytest.fixture
def image_folder(tmp_path):
  """Six listed images: PNGs of three sizes, a grayscale PNG, a JPEG, and one corrupt file."""
  folder = tmp_path / "My Photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  rows = []
  for i, (h, w) in enumerate([(40, 30), (64, 64), (17, 90)]):
    _write_png(folder / f"img{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rows.append({"file": f"img{i}.png", "caption": f"picture number {i}"})
  _write_png(folder / "gray.png", rng.integers(0, 256, (20, 20), dtype=np.uint8))
  rows.append({"file": "gray.png", "caption": "a gray one"})
  PIL.Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "c.jpg")
  rows.append({"file": "c.jpg", "caption": "a jpeg"})
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  rows.insert(2, {"file": "broken.png", "caption": "never readable"})
  (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder


def _folder_cfg(runlocal_config, folder, **kw):
  return _data_cfg(runlocal_config.data, name="image_caption_folder", folder=str(folder),
                   i2t_caption_key=None, **kw)


def test_folder_builder_skips_and_counts_bad_images(runlocal_config, image_folder, tmp_path,
                                                    caplog):
  cfg = _folder_cfg(runlocal_config, image_folder, folder_val_fraction=0.2)
  data_dir = str(tmp_path / "tfds")
  with caplog.at_level(logging.WARNING, logger="flowtok_jax.data.builders"):
    summary = builders.build(cfg, data_dir)
  skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert skipped == ["skipped 1 unreadable images of 6: broken.png"]
  assert "train=4 val=1" in summary and "skipped 1" in summary
  got = {}
  for split in ("train", "val"):
    src = builders.data_source(cfg, split, data_dir)
    for i in range(len(src)):
      got[src[i]["file"].decode()] = src[i]
  assert sorted(got) == ["c.jpg", "gray.png", "img0.png", "img1.png", "img2.png"]
  for name in ("img0.png", "img2.png", "gray.png"):  # Lossless: original pixels, as RGB.
    want = np.asarray(PIL.Image.open(image_folder / name).convert("RGB"))
    np.testing.assert_array_equal(got[name]["image"], want)
  assert got["img2.png"]["caption"] == b"picture number 2"
  # Always rebuilt from the folder: an edited listing shows up on the next build.
  lines = (image_folder / "captions.jsonl").read_text().splitlines()
  (image_folder / "captions.jsonl").write_text("\n".join(lines[:2]) + "\n")
  assert "train=1 val=1" in builders.build(cfg, data_dir)


def test_folder_builder_errors(runlocal_config, image_folder, tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(UserError, match="broken.png"):
    builders.build(_folder_cfg(runlocal_config, image_folder, on_bad_image="error"), data_dir)
  with pytest.raises(UserError, match="no captions.jsonl"):
    builders.build(_folder_cfg(runlocal_config, tmp_path), data_dir)
  with (image_folder / "captions.jsonl").open("a") as f:
    f.write(json.dumps({"file": "gone.png", "caption": "missing"}) + "\n")
  with pytest.raises(UserError, match="not found: gone.png"):
    builders.build(_folder_cfg(runlocal_config, image_folder), data_dir)
  with pytest.raises(UserError, match="data.folder is not set"):
    builders.build(_data_cfg(runlocal_config.data, name="image_caption_folder",
                             i2t_caption_key=None), data_dir)


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "flowtok_jax", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_data_build_then_show(tmp_path, runlocal_config):
  data_dir = str(tmp_path / "d")
  res = _run_cli("data", "build", "--config", DEMO + ":runlocal", "--data_dir", data_dir)
  assert res.returncode == 0, res.stderr
  assert "train=256 val=64 test=64 compositional=64" in res.stdout.splitlines()[-1]
  assert "\r" not in res.stderr  # No progress bars in a pipe.
  # The data is made here: no "Downloading ... Unknown size", no tfds warning about its own
  # half-built folder.
  assert "Downloading" not in res.stderr and "WARNING" not in res.stderr, res.stderr
  assert "Building dataset captioned_shapes in" in res.stderr
  out = str(tmp_path / "preview.png")
  assert cli.main(["data", "show", "--config", DEMO + ":runlocal", "--data_dir", data_dir,
                   "--split", "val", "--num", "4", "--out", out]) == 0
  grid = np.asarray(PIL.Image.open(out).convert("RGB"))
  first = shapes.render_example(0, "val", 0,
                                builders.shapes_config_from_data(runlocal_config.data)
                                .render_config)["image"]
  big = first.repeat(2, 0).repeat(2, 1)  # Upscaled x2, nearest.
  cell = grid[:grid.shape[0] // 2, :grid.shape[1] // 2]
  hits = [(y, x) for y in range(cell.shape[0] - 127) for x in range(cell.shape[1] - 127)
          if (cell[y, x] == big[0, 0]).all() and (cell[y:y + 128, x:x + 128] == big).all()]
  assert hits, "the first val image is not in the top-left cell of the preview"


def test_cli_data_text_tokenizer_trains_what_train_reads(shapes_data_dir, tmp_path, capsys):
  from flowtok_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
  data_dir = shapes_data_dir[1]
  out = str(tmp_path / "w" / "text_tokenizer.model")
  argv = ["data", "text_tokenizer", "--config", DEMO + ":runlocal", "--data_dir", data_dir]
  assert cli.main([*argv, "--out", out]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == {"out": out, "vocab_size": 128}
  tok = text_tokenizer.TextTokenizer.load(out)
  caption = builders.read_captions(shapes_data_dir[0], "train", data_dir, limit=1)[0]
  assert tok.decode(tok.encode([caption], 16)[0]) == [caption.lower()]
  # Never over an existing model (checkpoints depend on its ids); --out is needed.
  assert_one_error(*run_cli([*argv, "--out", out], capsys)[::2], "exists")
  assert_one_error(*run_cli(argv, capsys)[::2], "needs --out")


def test_cli_unknown_override_exits_2_with_one_line(tmp_path):
  res = _run_cli("data", "build", "--config", DEMO + ":runlocal", "--data_dir", str(tmp_path),
                 "--config.data.shapes.num_trian=5")
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("flowtok: error: unknown config key")
  assert "num_trian" in lines[0]
  assert not os.listdir(tmp_path)


def test_sources_and_builders_pickle_for_grain_workers(shapes_data_dir, tmp_path):
  data_cfg, data_dir = shapes_data_dir
  src = builders.data_source(data_cfg, "val", data_dir)
  copy = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(copy[3]["image"], src[3]["image"])
  # The default knobs name a listed BuilderConfig: tfds rebuilds it by name when unpickling.
  default_cfg = _data_cfg(data_cfg, **{"shapes.num_train": 20_000, "shapes.num_val": 1_000,
                                       "shapes.num_test": 1_000, "shapes.num_compositional": 1_000})
  name = builders.shapes_config_from_data(default_cfg).name
  assert name == builders.CaptionedShapes.BUILDER_CONFIGS[0].name
  builder = builders._own_builder(default_cfg, str(tmp_path))  # pylint: disable=protected-access
  assert pickle.loads(pickle.dumps(builder)).builder_config.name == name


def test_read_captions_matches_source_without_decoding_images(shapes_data_dir):
  data_cfg, data_dir = shapes_data_dir
  source = builders.data_source(data_cfg, "val", data_dir)
  captions = builders.read_captions(data_cfg, "val", data_dir, limit=10)
  assert captions == [source[i]["caption"].decode() for i in range(10)]
  assert len(builders.read_captions(data_cfg, "val", data_dir)) == len(source)


def test_nested_feature_keys_resolve_through_sequences():
  """data.caption_key='captions/text' is a feature of COCO-style datasets (a Sequence of dicts)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})})
  assert builders._has_feature(features, "image")
  assert builders._has_feature(features, "captions/text")
  assert not builders._has_feature(features, "captions/txt")
  assert not builders._has_feature(features, "image/text")
  assert not builders._has_feature(features, "caption")


def test_a_damaged_record_file_is_a_user_error(shapes_data_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from flowtok_jax.evaluation import shapes_eval  # pylint: disable=g-import-not-at-top
  data_cfg, data_dir = shapes_data_dir
  copy = tmp_path / "data"
  shutil.copytree(data_dir, copy)
  # This config's variant (the shared data dir may hold others).
  variant = os.path.relpath(
      builders._prepared_builder(data_cfg, data_dir).data_dir, data_dir)  # pylint: disable=protected-access
  (record,) = [os.path.join(copy, variant, f) for f in os.listdir(copy / variant)
               if "-val.array_record" in f]
  with open(record, "r+b") as fh:
    fh.truncate(1000)
  with pytest.raises(UserError, match="damaged"):
    shapes_eval.load_split(data_cfg, str(copy), "val", 4)


def test_split_specs_tfds_cannot_read_are_not_called_damage(shapes_data_dir):
  data_cfg, data_dir = shapes_data_dir
  with pytest.raises(UserError, match="one split spec at a time"):
    builders.data_source(data_cfg, "test,val", data_dir)
  with pytest.raises(UserError, match=r"^cannot read split 'val\[:x\]'"):
    builders.data_source(data_cfg, "val[:x]", data_dir)
  assert len(builders.data_source(data_cfg, "test+val", data_dir)) == 128
  with pytest.raises(UserError, match="no data dir"):
    builders.data_source(data_cfg, "val", None)


def test_folder_images_in_16_bit_greyscale_keep_their_tones(tmp_path):
  ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
  path = tmp_path / "deep.png"
  PIL.Image.fromarray(ramp).save(path)  # uint16: a 16-bit greyscale PNG.
  assert PIL.Image.open(path).mode.startswith("I")
  rgb = np.asarray(builders._read_image(str(path)))  # pylint: disable=protected-access
  assert rgb.shape == (64, 64, 3) and 100 < rgb.mean() < 155  # Not clipped to white (255).


def test_a_rebuilt_folder_dataset_has_a_new_identity(runlocal_config, image_folder, tmp_path):
  """Stored latents are tied to a dataset identity: reordered captions.jsonl, same record
  count, is another dataset (its latents would pair with the wrong records)."""
  from flowtok_jax.tools import pretokenize  # pylint: disable=g-import-not-at-top
  cfg = _folder_cfg(runlocal_config, image_folder)
  data_dir = str(tmp_path / "tfds")
  builders.build(cfg, data_dir)
  first = pretokenize.dataset_id(cfg, data_dir)
  assert pretokenize.dataset_id(cfg, data_dir) == first  # Stable while nothing changes.
  lines = (image_folder / "captions.jsonl").read_text().splitlines()
  (image_folder / "captions.jsonl").write_text("\n".join(lines[::-1]) + "\n")
  builders.build(cfg, data_dir)
  assert pretokenize.dataset_id(cfg, data_dir) != first


def test_tfds_opencv_advice_is_not_printed(caplog):
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  with caplog.at_level("WARNING"):
    absl_logging.warning("OpenCV is not installed. We recommend using OpenCV because it is "
                         "faster according to our benchmarks. Defaulting to PIL to decode "
                         "images...")
    absl_logging.warning("some other tfds warning")
  assert [r.getMessage() for r in caplog.records] == ["some other tfds warning"]
