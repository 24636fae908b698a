"""Train-loop tests: a persistent XLA compilation cache shared by tests and their subprocesses.

Every `train_and_evaluate` call traces fresh closures, so without a cache each run recompiles
the same init and train-step programs (seconds each on a busy 2-core CPU, mostly threefry).
The cache only skips compilation; programs and results are unchanged.
"""
import os
import tempfile

import jax

CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "flowtok_jax_test_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
os.environ.update({k: os.environ.get(k, v) for k, v in CACHE_ENV.items()})  # for subprocesses
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "configs", "demo.py")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
  """A tiny built captioned-shapes dataset and its text tokenizer: (config factory, workroot).

  `make(*overrides)` returns the demo's runlocal config at 32 px reading that dataset (tiny
  towers); put a stage's workdir under the workroot so it finds `text_tokenizer.model`.
  """
  from flowtok_jax import config_lib  # pylint: disable=g-import-not-at-top
  from flowtok_jax.data import builders, text_tokenizer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("shapes")
  data_dir = str(root / "data")

  def make(*overrides):
    return config_lib.load(DEMO + ":runlocal,res=32", [
        f"data.data_dir={data_dir}", "data.shapes.num_train=32", "data.shapes.num_val=24",
        "data.shapes.num_test=8", "data.shapes.num_compositional=8", "clip_text.depth=1",
        "tokenizer.encoder_depth=1", "tokenizer.decoder_depth=1", *overrides])

  config = make()
  builders.build(config.data, data_dir)
  captions = builders.read_captions(config.data, "train", data_dir)
  text_tokenizer.train_from_config(config.text_tokenizer, captions).save(
      str(root / "text_tokenizer.model"))
  return make, str(root)
