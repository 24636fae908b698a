"""Export bundles: contents from the right checkpoints; programs and bundle match the sampler."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_bundle
from cli_run import assert_one_error, run_cli

from flowtok_jax import checkpoint as ckpt_lib
from flowtok_jax import export
from flowtok_jax import flow_matching as fm
from flowtok_jax import inference
from flowtok_jax.errors import UserError
from flowtok_jax.models import flow as flow_lib
from flowtok_jax.models import text as text_lib
from flowtok_jax.models import tokenizer as tok_lib

PROMPTS = ["a red circle in the center", "a big blue square at the top left",
           "a green triangle left of a purple circle"]
STEPS = 4  # The fixture bundle's default (and its programs').
FAST = tiny_bundle.FAST_COMPILE


# -- the in-training sampler, straight from the runs' checkpoints --------------------------------

def _training_modules(config):
  return (text_lib.CLIPTextTower(text_lib.CLIPTextConfig.from_config(config.clip_text)),
          text_lib.TextVAE(text_lib.TextVAEConfig.from_config(config.text_vae)),
          flow_lib.FlowTransformer(flow_lib.FlowConfig.from_config(config.flow)),
          tok_lib.FlowTiTok(tok_lib.TokenizerConfig.from_config(config.tokenizer)),
          text_lib.TextDecoder(text_lib.TextDecoderConfig.from_config(config.text_decoder)))


def reference_t2i(runs, ids, seeds, cfg_scale):
  clip, vae, flow, tok, _ = _training_modules(runs.config)
  p = runs.params

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(ids, noise):
    feats = clip.apply({"params": runs.clip_text}, ids)
    mean, logvar = vae.apply({"params": p["text_vae"]}, feats)
    z = fm.sample(lambda x, t, n, d: flow.apply({"params": p["flow"]}, x, t, n, d),
                  mean + jnp.exp(0.5 * logvar) * noise, steps=STEPS, cfg_scale=cfg_scale,
                  sampler="euler", grid="parity", direction=0)
    x = tok.apply({"params": runs.tokenizer_params}, z / tiny_bundle.LATENT_SCALE, feats,
                  method=tok_lib.FlowTiTok.decode)
    return jnp.round(jnp.clip(x, 0, 1) * 255).astype(jnp.uint8)

  shape = (runs.config.clip_text.max_len, runs.config.tokenizer.token_channels)
  noise = np.stack([jax.random.normal(jax.random.key(int(s), impl="threefry2x32"), shape)
                    for s in seeds])
  return np.asarray(run(ids, noise))


def reference_i2t(runs, images):
  _, _, flow, tok, dec = _training_modules(runs.config)
  p = runs.params

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(images):
    mean, _ = tok.apply({"params": runs.tokenizer_params}, images,
                        method=tok_lib.FlowTiTok.encode)
    z = fm.sample(lambda x, t, n, d: flow.apply({"params": p["flow"]}, x, t, n, d),
                  mean * tiny_bundle.LATENT_SCALE, steps=STEPS, cfg_scale=1.0,
                  sampler="euler", grid="parity", direction=1)
    return jnp.argmax(dec.apply({"params": p["text_decoder"]}, z), -1)

  return np.asarray(run(images))


# -- tests ----------------------------------------------------------------------------------------

def test_bundle_holds_the_runs_parameters(tiny_runs, tiny_bundle_dir):
  b = inference.load_bundle(tiny_bundle_dir)
  meta = b.meta
  assert meta["format_version"] == inference.FORMAT_VERSION
  assert meta["latent_scale"] == pytest.approx(tiny_bundle.LATENT_SCALE)
  assert meta["capabilities"]["i2t"] and meta["random_parts"] == []
  assert meta["source"]["step"] == tiny_bundle.STEP
  # The run's planned length beside the exported step: a partly trained bundle says so.
  assert meta["source"]["total_steps"] == b.config.train.total_steps
  assert meta["defaults"]["t2i"] == {"steps": STEPS, "cfg_scale": 2.0, "sampler": "euler",
                                     "grid": "parity"}
  eq = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  for name in ("flow", "text_vae", "align_mlp", "text_decoder"):
    assert eq(b.params[name], tiny_runs.params[name]), name
  assert eq(b.params["clip_text"], tiny_runs.clip_text)
  # The decoder is not part of the flowtok run: it must come from init.tokenizer_from.
  assert eq(b.params["tokenizer"], tiny_runs.tokenizer_params)


def test_reexport_bfloat16_replaces_atomically(tiny_runs, tiny_bundle_dir, tmp_path):
  out = tmp_path / "b"
  shutil.copytree(tiny_bundle_dir, out)
  # Files the bundle does not own (an eval written with --out BUNDLE/eval) would be lost: refused.
  (out / "eval").mkdir()
  (out / "eval" / "eval.json").write_text("{}")
  with pytest.raises(UserError, match="would delete \\(eval\\)"):
    export.export_bundle(tiny_runs.flowtok, str(out), dtype="bfloat16")
  assert (out / "eval" / "eval.json").exists()
  shutil.rmtree(out / "eval")
  summary = export.export_bundle(tiny_runs.flowtok, str(out), dtype="bfloat16")
  assert sorted(os.listdir(tmp_path)) == ["b"]  # No temporary or old directories left.
  b = inference.load_bundle(str(out))
  assert b.meta["param_dtype"] == "bfloat16" and summary["dtype"] == "bfloat16"
  kernel = b.params["flow"]["x_embedder"]["kernel"]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_allclose(kernel.astype(np.float32),
                             tiny_runs.params["flow"]["x_embedder"]["kernel"], rtol=1e-2)


_STANDALONE = """
import sys, numpy as np, jax, flax.serialization
d, tmp = sys.argv[1], sys.argv[2]
params = flax.serialization.msgpack_restore(open(d + "/params.msgpack", "rb").read())
load = lambda name: jax.export.deserialize(bytearray(open(d + "/" + name, "rb").read()))
fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
run = lambda exp, *args: np.asarray(jax.jit(exp.call, compiler_options=fast)(params, *args))
x = np.load(tmp + "/inputs.npz")
np.save(tmp + "/t2i.npy", run(load("t2i.jaxexport"), x["ids"], x["seeds"], np.float32(2.0)))
np.save(tmp + "/i2t.npy", run(load("i2t.jaxexport"), x["images"], np.float32(1.0)))
assert not any(m.startswith("flowtok_jax") for m in sys.modules)
"""


def test_bundle_and_programs_match_the_training_sampler(tiny_runs, tiny_bundle_dir, tmp_path):
  """Generator, Captioner and the exported programs against the sampler on the checkpoints.

  One test, so the reference (two compiles) is computed once whichever worker runs it.
  """
  tok = inference.load_bundle(tiny_bundle_dir).tokenizer
  ids = inference.encode_prompts(tok, PROMPTS, 16)
  seeds = np.asarray([5, 6, 7], np.uint32)
  rng = np.random.default_rng(0)
  images = (rng.uniform(size=(3, 8, 8, 3)) * 255).astype(np.uint8).repeat(8, 1).repeat(8, 2)
  ref_t2i = reference_t2i(tiny_runs, ids, seeds, 2.0)
  ref_i2t = reference_i2t(tiny_runs, images.astype(np.float32) / 255)

  generated = inference.Generator(tiny_bundle_dir, batch_size=3,
                                  compiler_options=FAST).generate(PROMPTS, seeds.tolist())
  assert generated.shape == (3, 64, 64, 3) and generated.dtype == np.uint8
  assert generated.std() > 5  # Not a constant image: the comparison means something.
  assert np.abs(generated.astype(int) - ref_t2i).max() <= 1
  cap = inference.Captioner(tiny_bundle_dir, batch_size=3, compiler_options=FAST)
  assert cap.caption_images(list(images)) == tok.decode(ref_i2t)

  if not tiny_bundle.has_flatbuffers():
    pytest.skip("jax.export serialisation needs the 'flatbuffers' package")
  # Both programs, on a batch of 2 (the batch is symbolic), in an interpreter that never
  # imports this package.
  bundle = str(tmp_path / "bundle")
  summary = export.export_bundle(tiny_runs.flowtok, bundle, programs=True, steps=STEPS)
  assert summary["programs"] == ["i2t", "t2i"]
  assert "cpu" in inference.load_bundle(bundle).meta["programs"]["t2i"]["platforms"]
  np.savez(tmp_path / "inputs.npz", ids=ids[:2], seeds=seeds[:2],
           images=images[:2].astype(np.float32) / 255)
  subprocess.run([sys.executable, "-c", _STANDALONE, bundle, str(tmp_path)], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=tmp_path, timeout=300)
  t2i = np.load(tmp_path / "t2i.npy")
  assert t2i.shape == (2, 64, 64, 3) and t2i.dtype == np.uint8
  assert np.abs(t2i.astype(int) - ref_t2i[:2]).max() <= 1
  np.testing.assert_array_equal(np.load(tmp_path / "i2t.npy"), ref_i2t[:2])


def test_export_reads_the_frozen_steps_the_run_trained_with(tiny_runs, tmp_path):
  """The tokenizer run trained on after the flowtok run used its step 3: the bundle still holds
  step 3's encoder and decoder (recorded in the run's metadata), and says so when it is gone."""
  tok_dir, run = str(tmp_path / "tokenizer"), str(tmp_path / "flowtok")
  shutil.copytree(tiny_runs.tokenizer, tok_dir)
  shutil.copy(os.path.join(tiny_runs.root, "text_tokenizer.model"), tmp_path)
  config = ml_collections.ConfigDict(tiny_runs.config.to_dict())
  config.init.tokenizer_from = tok_dir
  used = ckpt_lib.pin(tok_dir)
  assert used.endswith(f"checkpoints/{tiny_bundle.STEP}")
  frozen = {"clip_text": tiny_bundle.STEP, "image_encoder": tiny_bundle.STEP}
  tiny_bundle.write_checkpoint(run, "flowtok", tiny_runs.params, config, frozen=frozen)
  newer = jax.tree.map(lambda x: np.asarray(x) + 1.0, tiny_runs.tokenizer_params)
  tiny_bundle.write_checkpoint(tok_dir, "tokenizer", newer, config, step=7, keep=2)
  export.export_bundle(run, str(tmp_path / "b"), steps=STEPS)
  got = inference.load_bundle(str(tmp_path / "b")).params["tokenizer"]
  for part in ("encoder", "decoder"):
    for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(tiny_runs.tokenizer_params[part])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A run that saves a newer step meanwhile: the step whose metadata was read is the one loaded.
  moved = jax.tree.map(lambda x: np.asarray(x) + 1.0, tiny_runs.params)
  tiny_bundle.write_checkpoint(run, "flowtok", moved, config, step=9, keep=2, frozen=frozen)
  load = export._load_run_params  # pylint: disable=protected-access
  loaded, _ = load(run, config, tiny_bundle.STEP, frozen)
  for a, b in zip(jax.tree.leaves(loaded["flow"]), jax.tree.leaves(tiny_runs.params["flow"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  shutil.rmtree(used)
  with pytest.raises(UserError, match="frozen image_encoder: this run trained with .*, which is "
                                      "gone"):
    export.export_bundle(run, str(tmp_path / "b2"), steps=STEPS)


def test_export_follows_a_moved_demo_directory(tiny_runs, tmp_path):
  """W/clip, W/tokenizer and W/flowtok moved together: the recorded init paths are gone, the
  siblings of the same names are used."""
  old = tmp_path / "old"
  old.mkdir()
  for name in ("clip", "tokenizer"):
    shutil.copytree(getattr(tiny_runs, name), old / name)
  shutil.copy(os.path.join(tiny_runs.root, "text_tokenizer.model"), old)
  config = ml_collections.ConfigDict(tiny_runs.config.to_dict())
  config.init.clip_from, config.init.tokenizer_from = str(old / "clip"), str(old / "tokenizer")
  tiny_bundle.write_checkpoint(str(old / "flowtok"), "flowtok", tiny_runs.params, config)
  os.rename(old, tmp_path / "new")
  export.export_bundle(str(tmp_path / "new" / "flowtok"), str(tmp_path / "b"), steps=STEPS)
  got = inference.load_bundle(str(tmp_path / "b")).params["tokenizer"]["decoder"]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tiny_runs.tokenizer_params["decoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_bad_workdirs_are_one_line_errors(tiny_runs, tiny_bundle_dir, tmp_path, capsys):
  out = str(tmp_path / "bundle")
  code, _, err = run_cli(["export", "--workdir", str(tmp_path / "nope"), "--out", out], capsys)
  assert_one_error(code, err, "no workdir at")
  code, _, err = run_cli(["export", "--workdir", "gs://bucket/w", "--out", out], capsys)
  assert_one_error(code, err, "--workdir gs://bucket/w", "mount")
  # A demo's root or a bundle given as the run: the error says where the run is.
  assert os.path.dirname(tiny_runs.flowtok) == tiny_runs.root
  code, _, err = run_cli(["export", "--workdir", tiny_runs.root, "--out", out], capsys)
  assert_one_error(code, err, "no checkpoint", f"--workdir {tiny_runs.flowtok}")
  code, _, err = run_cli(["export", "--workdir", tiny_bundle_dir, "--out", out], capsys)
  assert_one_error(code, err, "no checkpoint", "exported bundle")
  (tmp_path / "empty").mkdir()
  code, _, err = run_cli(["export", "--workdir", str(tmp_path / "empty"), "--out", out], capsys)
  assert_one_error(code, err, "no checkpoint")
  code, _, err = run_cli(["export", "--workdir", tiny_runs.tokenizer, "--out", out], capsys)
  assert_one_error(code, err, "'tokenizer'-stage", "flowtok-stage")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  code, _, err = run_cli(["export", "--workdir", tiny_runs.flowtok, "--out",
                          str(tmp_path / "busy")], capsys)
  assert_one_error(code, err, "not a bundle", "refusing")
  assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
  assert not os.path.exists(out)
  # A checkpoint whose array data is damaged (metadata intact): one line, not a traceback.
  damaged = tmp_path / "damaged"
  shutil.copytree(tiny_runs.flowtok, damaged)
  data_files = [os.path.join(d, f) for d, _, fs in os.walk(damaged / "checkpoints")
                for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
  assert data_files
  for f in data_files:
    with open(f, "r+b") as fh:
      fh.truncate(max(1, os.path.getsize(f) // 3))
  code, _, err = run_cli(["export", "--workdir", str(damaged), "--out", out], capsys)
  assert_one_error(code, err, "damaged")
  assert not os.path.exists(out)


def test_export_refuses_non_finite_parameters(tiny_runs, tmp_path, capsys, monkeypatch):
  load = export._load_run_params  # pylint: disable=protected-access

  def with_a_nan(*args, **kwargs):  # What a bit flip in a checkpoint's data can give.
    params, random_parts = load(*args, **kwargs)
    kernel = np.array(params["flow"]["x_embedder"]["kernel"])
    kernel.flat[3] = np.nan
    params["flow"]["x_embedder"]["kernel"] = kernel
    return params, random_parts

  monkeypatch.setattr(export, "_load_run_params", with_a_nan)
  out = tmp_path / "bundle"
  code, _, err = run_cli(["export", "--workdir", tiny_runs.flowtok, "--out", str(out)], capsys)
  assert_one_error(code, err, "non-finite values in flow/x_embedder/kernel", "nothing exported")
  assert not out.exists()


def test_export_cli_writes_a_loadable_bundle(tiny_runs, tmp_path, capsys):
  out = str(tmp_path / "t2i_only")
  code, stdout, err = run_cli(["export", "--workdir", tiny_runs.flowtok_t2i, "--out", out],
                              capsys)
  assert code == 0, err
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["t2i"] and not summary["i2t"] and summary["programs"] == []
  b = inference.load_bundle(out)
  assert "p_i2t = 0" in b.meta["capabilities"]["i2t_missing"]
  with pytest.raises(UserError, match="cannot caption"):
    inference.Captioner(b)


def test_export_cli_i2t_steps_set_only_the_image_to_text_default(tiny_runs, tmp_path, capsys):
  out = str(tmp_path / "b")
  code, stdout, err = run_cli(["export", "--workdir", tiny_runs.flowtok, "--out", out,
                               "--steps", "6", "--i2t_steps", "1"], capsys)
  assert code == 0, err
  defaults = json.loads(stdout.strip().splitlines()[-1])["defaults"]
  assert (defaults["t2i"]["steps"], defaults["i2t"]["steps"]) == (6, 1)
  b = inference.load_bundle(out)
  assert b.meta["defaults"] == defaults
  assert inference.Captioner(b).steps == 1 and inference.Generator(b).steps == 6
  code, _, err = run_cli(["export", "--workdir", tiny_runs.flowtok, "--out", out,
                          "--i2t_steps", "0"], capsys)
  assert_one_error(code, err, "--i2t_steps")
