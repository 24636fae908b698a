"""TrainState, EMA, the shared train step (incl. the two-player aux update), stage config merge."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flowtok_jax.errors import UserError
from flowtok_jax.train import loop, stage_api
from flowtok_jax.train.state import TrainState, ema_update


def test_ema_matches_formula():
  ema = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array(4.0)}}
  p = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(-1.0)}}
  out = ema_update(ema, p, 0.9)
  np.testing.assert_allclose(out["a"], 0.9 * np.array([1.0, -2.0]) + 0.1 * np.array([3.0, 0.0]))
  np.testing.assert_allclose(out["b"]["c"], 0.9 * 4.0 + 0.1 * -1.0, rtol=1e-6)
  np.testing.assert_allclose(ema_update(ema, p, 0.0)["a"], p["a"])  # decay 0 copies


def _linear_stage(start_step, on_aux_pass=None):
  """Generator w (scalar regression) + aux critic c trained on the generator's outputs.

  `on_aux_pass(step)` is called (on the host) each time the critic's loss actually runs.
  """
  def init(rng, b):
    del rng, b
    return {"w": jnp.array([[0.5]])}

  def loss_fn(params, frozen, batch, rng, step, aux_params):
    del frozen, rng, step
    pred = batch["x"] @ params["w"]
    # The generator also sees the critic (no gradient flows into it from here).
    loss = jnp.mean((pred - batch["y"]) ** 2) + 0.1 * jnp.mean(pred * aux_params["c"])
    return loss, stage_api.LossAux(metrics={"mse": loss}, outputs={"pred": pred})

  def aux_loss(aux_params, outputs, batch, rng, step):
    del batch, rng
    if on_aux_pass is not None:
      jax.debug.callback(lambda s: on_aux_pass(int(s)), step)
    loss = jnp.mean((aux_params["c"] - outputs["pred"]) ** 2)
    return loss, {"critic_gap": loss}

  aux = stage_api.AuxModule("critic", init=lambda r, b: {"c": jnp.zeros((1, 1))},
                            optimizer=optax.sgd(0.5), loss_fn=aux_loss, start_step=start_step)
  return stage_api.Stage(name="lin", init=init, loss_fn=loss_fn, optimizer=optax.sgd(0.1),
                         train_iter=lambda: iter(()), example_batch={}, ema_decay=0.5, aux=aux)


def test_two_player_step_gates_aux_until_start_step():
  stage = _linear_stage(start_step=2)
  state = jax.jit(loop.make_init_fn(stage, {}))(jax.random.PRNGKey(0))
  step = jax.jit(loop.make_train_step(stage))
  batch = {"x": jnp.ones((4, 1)), "y": jnp.zeros((4, 1))}
  seen_c = []
  for _ in range(4):
    w_before, c_before = float(state.params["w"][0, 0]), float(state.aux_params["c"][0, 0])
    ema_before = float(state.ema_params["w"][0, 0])
    state, m = step(state, {}, batch)
    seen_c.append(float(state.aux_params["c"][0, 0]))
    # Generator: plain SGD on mse + 0.1 * pred * c, with c read *before* this step's aux update.
    grad = 2 * w_before + 0.1 * c_before
    np.testing.assert_allclose(state.params["w"][0, 0], w_before - 0.1 * grad, rtol=1e-5)
    np.testing.assert_allclose(state.ema_params["w"][0, 0],
                               0.5 * ema_before + 0.5 * (w_before - 0.1 * grad), rtol=1e-5)
    assert "train/critic_loss" in m and "train/critic_gap" in m and "train/mse" in m
  assert int(state.step) == 4
  assert seen_c[0] == seen_c[1] == 0.0  # steps 0 and 1: before start_step, unchanged
  assert seen_c[2] != 0.0 and seen_c[3] != seen_c[2]  # from step 2 on the critic learns


def test_aux_passes_do_not_run_before_start_step():
  """Before start_step the critic's forward and backward are skipped, not computed and thrown
  away (a paper-scale GAN starting at step 200k would otherwise pay for its discriminator from
  step 0); its metrics read 0 until it starts."""
  ran = []
  stage = _linear_stage(start_step=2, on_aux_pass=ran.append)
  state = jax.jit(loop.make_init_fn(stage, {}))(jax.random.PRNGKey(0))
  step = jax.jit(loop.make_train_step(stage))
  batch = {"x": jnp.ones((4, 1)), "y": jnp.zeros((4, 1))}
  gaps = []
  for _ in range(4):
    state, m = step(state, {}, batch)
    gaps.append(float(m["train/critic_gap"]))
  jax.effects_barrier()
  assert ran == [2, 3]
  assert gaps[:2] == [0.0, 0.0] and gaps[2] > 0 and gaps[3] > 0
  # start_step 0: every step runs it, with no cond in the program.
  ran.clear()
  stage = _linear_stage(start_step=0, on_aux_pass=ran.append)
  state = jax.jit(loop.make_init_fn(stage, {}))(jax.random.PRNGKey(0))
  step = jax.jit(loop.make_train_step(stage))
  for _ in range(2):
    state, _ = step(state, {}, batch)
  jax.effects_barrier()
  assert ran == [0, 1]


def test_step_rng_is_folded_with_step():
  """Same state + batch -> same metrics; a different step -> a different key."""
  def loss_fn(params, frozen, batch, rng, step, aux_params):
    del frozen, batch, step, aux_params
    return jnp.sum(params["w"]) * 0.0, {"noise": jax.random.normal(rng, ())}
  stage = stage_api.Stage(name="r", init=lambda r, b: {"w": jnp.ones((1,))}, loss_fn=loss_fn,
                          optimizer=optax.sgd(0.0), train_iter=lambda: iter(()), example_batch={})
  state = loop.make_init_fn(stage, {})(jax.random.PRNGKey(1))
  step = jax.jit(loop.make_train_step(stage))
  _, m0 = step(state, {}, {})
  _, m0b = step(state, {}, {})
  _, m1 = step(state.replace(step=jnp.int32(1)), {}, {})
  assert float(m0["train/noise"]) == float(m0b["train/noise"])
  assert float(m0["train/noise"]) != float(m1["train/noise"])


def test_config_for_stage_merges_and_validates():
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(dict(total_steps=10, batch_size=4))
  c.optim = ml_collections.ConfigDict(dict(lr=1.0, b2=0.9))
  c.stages = ml_collections.ConfigDict(dict(a=dict(train=dict(total_steps=3), optim=dict(lr=0.5))))
  c.lock()
  a = stage_api.config_for_stage(c, "a")
  assert (a.train.total_steps, a.train.batch_size, a.optim.lr, a.optim.b2) == (3, 4, 0.5, 0.9)
  b = stage_api.config_for_stage(c, "b")  # no overrides for b
  assert (b.train.total_steps, b.optim.lr) == (10, 1.0)
  assert c.train.total_steps == 10  # the original is untouched
  c.unlock()
  c.stages.a.train.totl_steps = 5
  with pytest.raises(UserError, match="totl_steps"):
    stage_api.config_for_stage(c, "a")


def test_unknown_stage_is_user_error():
  with pytest.raises(UserError, match="unknown stage 'nope'"):
    stage_api.get_builder("nope")


def test_eval_params_prefers_ema():
  s = TrainState(step=0, params={"w": 1}, opt_state=(), ema_params={"w": 2}, rng=None)
  assert s.eval_params == {"w": 2}
  assert s.replace(ema_params=None).eval_params == {"w": 1}
