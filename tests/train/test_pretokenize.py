"""Pre-tokenized training data: `flowtok data pretokenize` stores a trained tokenizer's posteriors,
the pipeline joins them to the records by index, and the flowtok stage trains on them."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowtok_jax import checkpoint as ckpt_lib
from flowtok_jax.data import pipeline, text_tokenizer
from flowtok_jax.errors import UserError
from flowtok_jax.models import tokenizer as tok_lib
from flowtok_jax.tools import pretokenize
from flowtok_jax.train import flowtok_step, loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def stored(shapes_data):
  """(config factory, root, tokenizer workdir, latents dir, encode fn): a 2-step tokenizer and
  its posteriors of train and val."""
  make, root = shapes_data
  config = make()
  config.stages.tokenizer.train.update(total_steps=2, eval_every_steps=0, ckpt_every_steps=2)
  work = os.path.join(root, "pt_tokenizer")
  loop.train_and_evaluate(config, work, "tokenizer")
  out = os.path.join(root, "latents")
  meta = pretokenize.pretokenize(config, work, config.data.data_dir, out, ["train", "val"],
                                 batch_size=7, progress=False)  # 7: a padded last batch
  assert meta["splits"] == {"train": 32, "val": 24}
  tc = tok_lib.TokenizerConfig.from_config(config.tokenizer)
  encoder = tok_lib.FlowTiTokEncoder(tc)
  s = tc.image_size
  target = jax.eval_shape(lambda: nn.meta.unbox(
      encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))["params"]))
  params, _ = ckpt_lib.load_params(work, target, select=("encoder",))
  encode = jax.jit(lambda x: encoder.apply({"params": params}, x))
  return make, root, work, out, encode


def test_stored_posteriors_are_the_encoders(stored):
  make, _, _, out, encode = stored
  config = make()
  meta = pretokenize.read_meta(out)
  assert (meta["num_tokens"], meta["token_channels"], meta["dtype"]) == (16, 8, "float16")
  from flowtok_jax.data import builders  # pylint: disable=g-import-not-at-top
  source = builders.data_source(config.data, "val", config.data.data_dir)
  images = np.stack([pipeline.load_image(source[i], "image", 32) for i in range(len(source))])
  mean, logvar = jax.device_get(encode(images))
  smean, slogvar = pretokenize.open_split(out, "val")
  assert smean.dtype == np.float16 and smean.shape == (24, 16, 8)
  np.testing.assert_allclose(smean, mean, atol=2e-3, rtol=2e-3)
  np.testing.assert_allclose(slogvar, logvar, atol=2e-2, rtol=2e-3)
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("num_workers, process_index, process_count", [
    (0, 0, 1),
    (2, 0, 1),  # grain worker processes reopen the memory maps (the source pickles as paths)
    (0, 1, 2),  # the second of two hosts reads its own block of records and their latents
])
def test_pipeline_joins_latents_to_records_under_shuffle(stored, num_workers, process_index,
                                                         process_count):
  """Same seed: the latents iterator's rows are the image iterator's rows, encoded."""
  make, root, _, out, encode = stored
  config = make()
  config.data.num_workers = num_workers
  tok = text_tokenizer.TextTokenizer.load(os.path.join(root, "text_tokenizer.model"))
  kw = dict(split="train", global_batch_size=8, seed=3, process_index=process_index,
            process_count=process_count)
  rows = 8 // process_count
  with_images = pipeline.make_iterator(config.data, tok, **kw)
  with_latents = pipeline.make_iterator(config.data, tok, latents_dir=out, **kw)
  try:
    for _ in range(5):  # 40 global rows: across an epoch boundary (32 records)
      a, b = next(with_images), next(with_latents)
      assert "image" not in b and b["latent_mean"].shape == (rows, 16, 8)
      assert b["latent_mean"].dtype == np.float32
      np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
      np.testing.assert_allclose(b["latent_mean"], jax.device_get(encode(a["image"]))[0],
                                 atol=2e-3, rtol=2e-3)
  finally:
    if num_workers:
      with_images.close()
      with_latents.close()


def test_flowtok_stage_trains_on_stored_latents(stored, monkeypatch):
  make, root, work, out, _ = stored
  seen = []
  real = flowtok_step.flowtok_loss

  def spy(models, lc, params, frozen, batch, *args, **kwargs):
    seen.append(sorted(batch))
    return real(models, lc, params, frozen, batch, *args, **kwargs)

  monkeypatch.setattr(flowtok_step, "flowtok_loss", spy)
  config = make()
  config.data.latents_dir = out
  config.init.tokenizer_from = work
  config.flowtok_stage.p_i2t = 0.5
  config.stages.flowtok.train.update(total_steps=2, eval_every_steps=2, ckpt_every_steps=2,
                                     ema_decay=None)
  config.train.log_every_steps = 1
  result = loop.train_and_evaluate(config, os.path.join(root, "flow_latents"), "flowtok")
  assert result.step == 2 and np.isfinite(result.last_metrics["train/loss"])
  # The train step saw stored posteriors; the held-out evaluator, val images.
  assert ["latent_logvar", "latent_mean", "text_ids", "truncated"] in [
      [k for k in b if k != "i2t_text_ids"] for b in seen]
  assert any("image" in b for b in seen)
  assert np.isfinite(result.last_eval["eval/val/rel_loss_t2i"])
  # latent_scale came from the stored posteriors and reached the checkpoint's config.
  from flowtok_jax import export  # pylint: disable=g-import-not-at-top
  meta, _ = export.read_run_meta(os.path.join(root, "flow_latents"))
  assert meta["config"]["tokenizer"]["latent_scale"] > 0


def test_latents_that_do_not_fit_are_one_line_errors(stored, tmp_path):
  make, _, _, out, _ = stored
  config = make()
  meta = pretokenize.read_meta(out)
  pretokenize.check_meta(meta, config, "train")
  config.tokenizer.token_channels = 4
  with pytest.raises(UserError, match="token_channels=8"):
    pretokenize.check_meta(meta, config, "train")
  with pytest.raises(UserError, match="no pre-tokenized latents for split 'test'"):
    pretokenize.check_meta(meta, make(), "test")
  with pytest.raises(UserError, match="has 32 rows but the dataset has 40"):
    pretokenize.open_split(out, "train", num_records=40)
  with pytest.raises(UserError, match="pretokenize` first"):
    pretokenize.read_meta(str(tmp_path))
  # Made by another tokenizer checkpoint, or with none to check against: refused.
  config = make(f"data.latents_dir={out}")
  with pytest.raises(UserError, match="needs init.tokenizer_from"):
    pretokenize.check_sources(meta, config)
  config = make(f"data.latents_dir={out}", f"init.tokenizer_from={tmp_path}")
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  with pytest.raises(UserError, match="made by tokenizer checkpoint"):
    pretokenize.check_sources(meta, config)
  # Arrays that do not match latents.json (a foreign or half-written file): one line.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / pretokenize.META_FILE).write_text(json.dumps(dict(meta, token_channels=4)))
  for part in ("mean", "logvar"):
    np.save(pretokenize.split_file(str(bad), "train", part), np.zeros((32, 16, 8), np.float16))
  with pytest.raises(UserError, match="says K = 16, C = 4"):
    pretokenize.open_split(str(bad), "train")


def test_cli_pretokenize_needs_its_inputs(stored, tmp_path):
  make, _, work, _, _ = stored
  data_dir = make().data.data_dir
  base = [sys.executable, "-m", "flowtok_jax", "data", "pretokenize",
          f"--config={os.path.join(REPO, 'configs', 'demo.py')}:runlocal,res=32",
          f"--data_dir={data_dir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run(base + [f"--tokenizer={work}"], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode != 0 and "needs --out" in r.stderr.strip().splitlines()[-1]
  r = subprocess.run(base + [f"--out={tmp_path}"], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode != 0 and "needs the tokenizer" in r.stderr.strip().splitlines()[-1]
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  r = subprocess.run(base + [f"--tokenizer={work}", f"--out={a_file}"], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode != 0 and "is a file" in r.stderr.strip().splitlines()[-1]
  # A mistyped split is refused before anything is written: no latents.json, no directory.
  config = make()
  with pytest.raises(UserError, match="trian"):
    pretokenize.pretokenize(config, work, data_dir, str(tmp_path / "lat"), ["train", "trian"],
                            progress=False)
  assert not (tmp_path / "lat").exists()


def test_another_stages_workdir_as_the_tokenizer_is_named(stored, tmp_path, monkeypatch):
  make, _, work, _, _ = stored
  config = make()
  monkeypatch.setattr(ckpt_lib, "latest_meta", lambda path: {"stage": "clip"})
  with pytest.raises(UserError, match="holds a 'clip'-stage checkpoint; give the tokenizer"):
    pretokenize.pretokenize(config, work, config.data.data_dir, str(tmp_path / "l"), ["val"],
                            progress=False)
  assert not os.path.exists(tmp_path / "l")
