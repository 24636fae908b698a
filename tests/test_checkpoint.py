"""Orbax checkpoints: round trip with the data position, shape checks, params-only loads."""
import gc
import logging
import os
import sys
import time
import types

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowtok_jax import checkpoint
from flowtok_jax.errors import UserError
from flowtok_jax.train.state import TrainState

_CFG = ml_collections.ConfigDict(dict(max_to_keep=2, async_save=True))
_ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(hidden=4, step=3, scale=1.0):
  params = {"enc": {"kernel": scale * jnp.ones((3, hidden)), "bias": jnp.zeros((hidden,))},
            "head": {"kernel": scale * jnp.full((hidden, 2), 2.0)}}
  return TrainState(step=jnp.int32(step), params=params, opt_state=(jnp.zeros(()),),
                    ema_params=jax.tree.map(lambda x: x + 1.0, params),
                    rng=jax.random.PRNGKey(0))


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_ONE), tree)


def _iter():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def _save(workdir, state, it, step=None):
  with checkpoint.Checkpointer(str(workdir), _CFG) as ck:
    ck.save(int(state.step) if step is None else step, state, it, {"stage": "toy"})


def test_round_trip_with_data_position(tmp_path):
  it = _iter()
  next(it)
  _save(tmp_path, _state(), it)
  next(it)  # consumed after the save: must not count
  it2 = _iter()
  with checkpoint.Checkpointer(str(tmp_path), _CFG) as ck:
    assert ck.latest_step() == 3
    state, meta = ck.restore(_abstract(_state()), it2)
  assert isinstance(state, TrainState) and int(state.step) == 3 and meta["stage"] == "toy"
  np.testing.assert_array_equal(state.ema_params["head"]["kernel"], np.full((4, 2), 3.0))
  np.testing.assert_array_equal(next(it2), [4, 5, 6, 7])  # the second batch


def test_mismatched_shapes_name_the_param(tmp_path):
  _save(tmp_path, _state(hidden=4), _iter())
  with checkpoint.Checkpointer(str(tmp_path), _CFG) as ck:
    with pytest.raises(UserError, match=r"params/enc/bias has shape \(4,\) in the checkpoint "
                                        r"but \(6,\) in the config"):
      ck.restore(_abstract(_state(hidden=6)), _iter())


def test_corrupt_checkpoint_is_user_error(tmp_path):
  _save(tmp_path, _state(), _iter())
  state_dir = tmp_path / "checkpoints" / "3" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with checkpoint.Checkpointer(str(tmp_path), _CFG) as ck:
    with pytest.raises(UserError, match="checkpoint"):
      ck.restore(_abstract(_state()), _iter())


def test_damaged_data_is_one_error_naming_the_earlier_step_without_loop_noise(tmp_path):
  """Truncated array files: one UserError that names the step to resume from instead; the
  'Event loop is closed' reports of orbax's reads still in flight are dropped, others are not."""
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: seen.append(u.exc_value)
  try:
    _save(tmp_path, _state(step=3), _iter())
    _save(tmp_path, _state(step=5), _iter())
    for root, _, files in os.walk(tmp_path / "checkpoints" / "5" / "state"):
      for f in files:
        if os.path.basename(root) == "d":
          path = os.path.join(root, f)
          with open(path, "r+b") as fh:
            fh.truncate(max(1, os.path.getsize(path) // 3))
    with checkpoint.Checkpointer(str(tmp_path), _CFG) as ck:
      with pytest.raises(UserError, match=r"checkpoints/5 \(damaged\?\).*resume from step 3") as e:
        ck.restore(_abstract(_state()), _iter())
    assert "\n" not in str(e.value) and "tensorstore_spec" not in str(e.value)
    time.sleep(0.5)
    gc.collect()
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("another")))
    assert [type(x).__name__ for x in seen] == ["ValueError"], seen
    def record(exc):
      return logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                               "Task exception was never retrieved", None, (type(exc), exc, None))
    asyncio_log = logging.getLogger("asyncio")
    assert not asyncio_log.filter(record(ValueError("OUT_OF_RANGE: ... [tensorstore_spec='{}']")))
    assert asyncio_log.filter(record(ValueError("some other task failure")))
  finally:
    sys.unraisablehook = previous


def test_max_to_keep_keeps_newest(tmp_path):
  it = _iter()
  with checkpoint.Checkpointer(str(tmp_path), _CFG) as ck:
    for step in (1, 2, 3):
      ck.save(step, _state(step=step), it, {})
      ck.wait()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]


def test_load_params_subtree_and_missing(tmp_path):
  _save(tmp_path, _state(hidden=4), _iter())
  # A subtree of the EMA params (as frozen parts use it), from the workdir.
  target = _abstract({"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))})
  got, missing = checkpoint.load_params(str(tmp_path), target, select=("enc",))
  assert not missing
  np.testing.assert_array_equal(got["kernel"], np.full((3, 4), 2.0))  # ema = params + 1
  got, _ = checkpoint.load_params(str(tmp_path / "checkpoints" / "3"), target, select=("enc",),
                                  use_ema=False)
  np.testing.assert_array_equal(got["kernel"], np.ones((3, 4)))
  # init_from into a grown model: a new param keeps its init (reported missing); a reshaped one
  # is an error naming it.
  grown = _abstract({**_state().params, "dir_emb": jnp.zeros((2, 4))})
  got, missing = checkpoint.load_params(str(tmp_path), grown, allow_missing=True)
  assert missing == ["ema_params/dir_emb"] and got["dir_emb"] is None
  np.testing.assert_array_equal(got["head"]["kernel"], np.full((4, 2), 3.0))
  with pytest.raises(UserError, match=r"ema_params/enc/bias has shape \(4,\) in the checkpoint"):
    checkpoint.load_params(str(tmp_path), _abstract(_state(hidden=5).params), allow_missing=True)
  with pytest.raises(UserError, match="has no ema_params/dec: it is a 'toy'-stage checkpoint"):
    checkpoint.load_params(str(tmp_path), target, select=("dec",))


def test_missing_checkpoint_dir_is_user_error(tmp_path):
  with pytest.raises(UserError, match="no checkpoint at"):
    checkpoint.load_params(str(tmp_path / "nope"), {})


def test_pin_latest_meta_and_quiet_read_only_opens(tmp_path, caplog):
  """A finished run's checkpoints are opened read-only on purpose: no orbax notice for it."""
  _save(tmp_path, _state(step=3), _iter())
  _save(tmp_path, _state(step=5), _iter())
  with caplog.at_level(logging.WARNING):
    assert checkpoint.pin(str(tmp_path)) == os.path.join(str(tmp_path), "checkpoints", "5")
    assert checkpoint.pin(str(tmp_path), 3).endswith(os.path.join("checkpoints", "3"))
    assert checkpoint.latest_meta(str(tmp_path)) == {"stage": "toy"}
  assert not [r for r in caplog.records if "read only" in r.getMessage()], caplog.text
  assert checkpoint.latest_meta(str(tmp_path / "none")) == {}
