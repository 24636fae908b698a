"""Serving from a bundle: reproducible seeds, `flowtok generate` / `caption`, bad inputs."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_bundle
from cli_run import assert_one_error, run_cli
from PIL import Image

from flowtok_jax import inference

FAST = tiny_bundle.FAST_COMPILE
PROMPTS = ["a red circle in the center", "a big blue square at the top left",
           "a green triangle left of a purple circle"]


@pytest.fixture(autouse=True)
def fast_servers(monkeypatch):
  """Servers the CLI makes compile like the tests' own (and share their programs)."""
  monkeypatch.setattr(inference, "DEFAULT_COMPILER_OPTIONS", FAST)


def save(path, array, **kw):
  Image.fromarray(array).save(path, **kw)
  return str(path)


def test_seeds_reproduce_images_in_any_batch(tiny_bundle_dir):
  gen = inference.Generator(tiny_bundle_dir, batch_size=3)
  first = gen.generate(PROMPTS, [5, 6, 7])
  np.testing.assert_array_equal(gen.generate(PROMPTS, [5, 6, 7]), first)
  other = gen.generate(PROMPTS, [5, 9, 7])
  np.testing.assert_array_equal(other[[0, 2]], first[[0, 2]])
  assert (other[1] != first[1]).mean() > 0.05  # A new seed, a new image (weights are random).
  alone = gen.generate(PROMPTS[2:], [7])  # Another slot of a padded batch.
  assert np.abs(alone[0].astype(int) - first[2]).max() <= 1


def test_generate_cli_writes_pngs_and_samples_json(tiny_bundle_dir, tmp_path, capsys):
  out = tmp_path / "gen"
  code, stdout, err = run_cli(["generate", "--bundle", tiny_bundle_dir, "--prompt", PROMPTS[0],
                               "--prompt", PROMPTS[1], "--num", "2", "--seed", "10",
                               "--batch_size", "3", "--out", str(out)], capsys)
  assert code == 0, err
  assert json.loads(stdout.strip().splitlines()[-1])["images"] == 4
  # Four images in two compiled calls: progress with an ETA, as whole lines off a terminal.
  assert "generate: 100% 4/4 [" in err and "\r" not in err, err
  samples = json.loads((out / "samples.json").read_text())
  assert [(s["file"], s["prompt"], s["seed"]) for s in samples] == [
      ("0000.png", PROMPTS[0], 10), ("0001.png", PROMPTS[0], 11),
      ("0002.png", PROMPTS[1], 12), ("0003.png", PROMPTS[1], 13)]
  assert samples[0]["steps"] == 4 and samples[0]["cfg_scale"] == 2.0
  assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == [s["file"] for s in samples]
  # Any image comes back from its recorded prompt and seed alone.
  png = np.asarray(Image.open(out / "0003.png"))
  again = inference.Generator(tiny_bundle_dir, batch_size=3).generate([PROMPTS[1]], [13])[0]
  assert png.shape == (64, 64, 3) and np.abs(png.astype(int) - again).max() <= 1
  # Again into the same directory with fewer images: the earlier run's extra images go, files
  # it did not write stay.
  (out / "notes.txt").write_text("mine")
  code, _, err = run_cli(["generate", "--bundle", tiny_bundle_dir, "--prompt", PROMPTS[0],
                          "--batch_size", "3", "--out", str(out)], capsys)
  assert code == 0, err
  assert "generate:" not in err  # One compiled call: no progress lines.
  assert sorted(os.listdir(out)) == ["0000.png", "notes.txt", "samples.json"]


def test_generate_reads_prompts_from_a_file(tiny_bundle_dir, tmp_path, capsys, monkeypatch):
  listed = tmp_path / "prompts.txt"
  listed.write_text(f"{PROMPTS[1]}\n\n  {PROMPTS[2]}  \n", encoding="utf-8")
  out = tmp_path / "gen"
  code, _, err = run_cli(["generate", "--bundle", tiny_bundle_dir, "--prompt", PROMPTS[0],
                          "--prompts_file", str(listed), "--batch_size", "3", "--out", str(out)],
                         capsys)
  assert code == 0, err
  samples = json.loads((out / "samples.json").read_text())
  assert [(s["prompt"], s["seed"]) for s in samples] == [(p, j) for j, p in enumerate(PROMPTS)]
  # '-' reads stdin.
  monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPTS[2] + "\n"))
  code, _, err = run_cli(["generate", "--bundle", tiny_bundle_dir, "--prompts_file", "-",
                          "--batch_size", "3", "--out", str(tmp_path / "stdin")], capsys)
  assert code == 0, err
  assert [s["prompt"] for s in json.loads((tmp_path / "stdin" / "samples.json").read_text())] \
      == [PROMPTS[2]]
  gen = ["generate", "--bundle", tiny_bundle_dir, "--out", str(tmp_path / "o"), "--prompts_file"]
  assert_one_error(*run_cli(gen + [str(tmp_path / "missing.txt")], capsys)[::2], "cannot read",
                   "missing.txt")
  (tmp_path / "blank.txt").write_text("\n  \n")
  assert_one_error(*run_cli(gen + [str(tmp_path / "blank.txt")], capsys)[::2], "no prompts")
  (tmp_path / "latin1.txt").write_bytes("a red circle caf\xe9\n".encode("latin-1"))
  assert_one_error(*run_cli(gen + [str(tmp_path / "latin1.txt")], capsys)[::2], "cannot read")
  assert not (tmp_path / "o").exists()


def test_caption_cli_prints_one_json_line_per_image(tiny_bundle_dir, tmp_path, capsys):
  rng = np.random.default_rng(1)
  square = (rng.uniform(size=(8, 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
  wide = np.zeros((50, 80, 3), np.uint8)
  wide[10:30, 30:50] = (220, 40, 40)
  paths = [save(tmp_path / "a.png", square), save(tmp_path / "b.jpg", wide, quality=95),
           save(tmp_path / "c.png", square[::2, ::2])]  # 32 px: upscaled to the model's 64.
  code, stdout, err = run_cli(["caption", "--bundle", tiny_bundle_dir, "--batch_size", "3",
                               *paths], capsys)
  assert code == 0, err
  records = [json.loads(line) for line in stdout.strip().splitlines()]
  assert [r["image"] for r in records] == paths
  want = inference.Captioner(tiny_bundle_dir, batch_size=3).caption_files(paths)
  assert [r["caption"] for r in records] == want
  assert all(isinstance(r["caption"], str) for r in records)


def test_bad_prompts_and_flags_are_one_line_errors(tiny_bundle_dir, tmp_path, capsys):
  gen = ["generate", "--bundle", tiny_bundle_dir, "--out", str(tmp_path / "o")]
  for prompt in ("", "   "):
    assert_one_error(*run_cli(gen + ["--prompt", prompt], capsys)[::2], "empty prompt")
  # Nothing the text tokenizer knows (shapes captions have no CJK or emoji): refused.
  for prompt in ("\u732b", "\U0001F642\U0001F642"):
    assert_one_error(*run_cli(gen + ["--prompt", prompt], capsys)[::2], "nothing the text "
                     "tokenizer knows")
  code, _, err = run_cli(gen + ["--prompt", PROMPTS[0], "--prompt", "a red circle " * 8], capsys)
  assert_one_error(code, err, "too long", "tokens", "at most 15")
  assert "'a red circle a red circle a red circle a red circle a red...'" in err  # Shortened.
  for flags, needle in ((["--num", "0"], "--num"), (["--steps", "0"], "--steps"),
                        (["--seed", "-1"], "--seed"), (["--config.seed=1"], "does not apply"),
                        (["--cfg", "1e30"], "guidance scale must be in [0, 100]"),
                        (["--cfg", "-5"], "guidance scale must be in [0, 100]")):
    assert_one_error(*run_cli(gen + ["--prompt", PROMPTS[0], *flags], capsys)[::2], needle)
  assert not (tmp_path / "o").exists()  # Nothing written for a refused request.
  # A file of the user's where an image would go is never overwritten.
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "0000.png").write_bytes(b"my own picture")
  mine = ["generate", "--bundle", tiny_bundle_dir, "--out", str(tmp_path / "mine")]
  assert_one_error(*run_cli(mine + ["--prompt", PROMPTS[0]], capsys)[::2], "already holds "
                   "0000.png", "no earlier `flowtok generate` wrote")
  assert (tmp_path / "mine" / "0000.png").read_bytes() == b"my own picture"


def test_bad_bundles_are_one_line_errors(tiny_bundle_dir, tmp_path, capsys):
  def gen(bundle):
    return run_cli(["generate", "--bundle", str(bundle), "--prompt", PROMPTS[0], "--out",
                    str(tmp_path / "o")], capsys)[::2]

  assert_one_error(*gen(tmp_path / "missing"), "no bundle at")
  assert_one_error(*gen("gs://bucket/bundle"), "--bundle gs://bucket/bundle", "mount")
  (tmp_path / "plain").mkdir()
  assert_one_error(*gen(tmp_path / "plain"), "not a flowtok bundle")
  bad = tmp_path / "bad"
  shutil.copytree(tiny_bundle_dir, bad)
  params = (bad / inference.PARAMS_FILE).read_bytes()
  (bad / inference.PARAMS_FILE).write_bytes(params[: len(params) // 2])
  assert_one_error(*gen(bad), "corrupt", inference.PARAMS_FILE)
  (bad / inference.BUNDLE_JSON).write_text("{not json")
  assert_one_error(*gen(bad), "unreadable", inference.BUNDLE_JSON)
  with open(os.path.join(tiny_bundle_dir, inference.BUNDLE_JSON)) as f:
    meta = json.load(f)
  (bad / inference.BUNDLE_JSON).write_text(json.dumps(dict(meta, format_version=99)))
  assert_one_error(*gen(bad), "format version 99", "re-export")
  (bad / inference.BUNDLE_JSON).write_text(json.dumps(dict(meta, files=["params.msgpack"])))
  assert_one_error(*gen(bad), "'files' is not a mapping")
  # Sampler defaults the bundle itself holds are named as the bundle's, not as a flag.
  (bad / inference.BUNDLE_JSON).write_text(json.dumps(dict(meta, defaults=dict(
      meta["defaults"], t2i=dict(meta["defaults"]["t2i"], steps=-3)))))
  shutil.copy(os.path.join(tiny_bundle_dir, inference.PARAMS_FILE), bad / inference.PARAMS_FILE)
  assert_one_error(*gen(bad), "'defaults.t2i' are invalid", "--steps must be at least 1",
                   "re-export")
  # Checksums that match parameters that do not fit the config (a leaf of the wrong shape).
  import flax.serialization  # pylint: disable=g-import-not-at-top
  params = flax.serialization.msgpack_restore(
      open(os.path.join(tiny_bundle_dir, inference.PARAMS_FILE), "rb").read())
  kernel = params["flow"]["x_embedder"]["kernel"]
  params["flow"]["x_embedder"]["kernel"] = np.zeros(kernel.shape[:-1] + (kernel.shape[-1] + 1,),
                                                    kernel.dtype)
  (bad / inference.PARAMS_FILE).write_bytes(flax.serialization.msgpack_serialize(params))
  files = dict(meta["files"], **{inference.PARAMS_FILE: inference.file_sha256(
      str(bad / inference.PARAMS_FILE))})
  (bad / inference.BUNDLE_JSON).write_text(json.dumps(dict(meta, files=files)))
  assert_one_error(*gen(bad), "do not fit the config")


def test_bad_images_are_one_line_errors(tiny_bundle_dir, tmp_path, capsys):
  good = save(tmp_path / "good.png", np.zeros((64, 64, 3), np.uint8))
  tiny = save(tmp_path / "tiny.png", np.zeros((1, 1, 3), np.uint8))
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  cases = [(tiny, "1x1 pixels", "too small"), (str(text), "not a readable image"),
           (str(tmp_path / "nope.png"), "no such file"), (str(tmp_path), "directory")]
  for path, *needles in cases:
    code, out, err = run_cli(["caption", "--bundle", tiny_bundle_dir, good, path], capsys)
    assert_one_error(code, err, path, *needles)
    assert out == ""  # Checked before any captioning: no partial output.


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tiny_bundle_dir, tmp_path, capsys):
  """PIL's convert('RGB') clips 16-bit values to 255; the image must read as its 8-bit self."""
  grey = np.zeros((64, 64), np.uint8)
  grey[16:48, 16:48] = 200
  eight = save(tmp_path / "g8.png", grey)
  sixteen = str(tmp_path / "g16.png")
  Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen)
  with Image.open(sixteen) as img:
    assert img.mode.startswith("I")
  np.testing.assert_array_equal(inference.load_image(sixteen, 64), inference.load_image(eight, 64))


def test_t2i_only_bundle_refuses_to_caption(tiny_bundle_dir, tmp_path, capsys):
  t2i = tmp_path / "t2i"
  shutil.copytree(tiny_bundle_dir, t2i)
  meta = json.loads((t2i / inference.BUNDLE_JSON).read_text())
  meta["capabilities"] = {"t2i": True, "i2t": False,
                          "i2t_missing": "it was trained text-to-image only (p_i2t = 0)"}
  (t2i / inference.BUNDLE_JSON).write_text(json.dumps(meta))
  img = save(tmp_path / "a.png", np.zeros((64, 64, 3), np.uint8))
  code, _, err = run_cli(["caption", "--bundle", str(t2i), img], capsys)
  assert_one_error(code, err, "cannot caption", "text-to-image only")


def test_console_entry_point_reports_errors_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "flowtok_jax", "caption", "--bundle",
                         str(tmp_path / "none"), str(tmp_path / "x.png")],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"flowtok: error: no bundle at {tmp_path / 'none'}"]


def test_progress_on_feeds_one_meter_and_detaches_however_the_block_ends(capsys):
  """Several servers and the caller feed one meter; an error part-way still closes it (its last
  line printed) and leaves no server writing to a closed meter."""

  class Server:
    batch_size, progress = 2, None

  a, b = Server(), Server()
  with pytest.raises(RuntimeError):
    with inference.progress_on(6, "eval", a, None, b) as update:
      a.progress(2)
      b.progress(1)
      update(1)
      raise RuntimeError("part-way")
  assert a.progress is None and b.progress is None
  err = capsys.readouterr().err
  assert "eval:  67% 4/6 [" in err.splitlines()[-1], err
  with inference.progress_on(2, "one call", a) as update:  # One compiled call: no meter.
    update(2)
  assert a.progress is None and "one call" not in capsys.readouterr().err
