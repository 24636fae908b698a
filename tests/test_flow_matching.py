"""Flow matching: interpolant, time sampler, null roll, and samplers on an analytic flow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowtok_jax import flow_matching as fm
from flowtok_jax.tools import sampler_error
from flowtok_jax.errors import UserError

SIG = fm.SIGMA_MIN
# Jitted once per shape: eager dispatch of each small op costs more than compiling the whole.
null_roll = jax.jit(fm.null_roll, static_argnames=("p", "num_shards"))
roll_marked = jax.jit(fm._roll_marked)


# -- analytic flow ---------------------------------------------------------------------------------
# Source x0 ~ N(0, 1) per channel, target x1 ~ N(m, s²) independent: the marginal velocity is
# affine in x and the ODE has a closed form (tools/sampler_error.py; checked below by finite
# differences, so the error measurements rest on it honestly).

exact_velocity = sampler_error.exact_velocity
exact_solution = sampler_error.exact_solution


def analytic_fn(seen=None):
  def fn(x, t, null, direction):
    if seen is not None:
      seen.append(direction)
    return exact_velocity(x, t)
  return fn


@pytest.fixture(scope="module")
def x0():
  return jax.random.normal(jax.random.PRNGKey(0), (4, 5, 3))


def _error(x0, steps, sampler, grid="uniform"):
  run = jax.jit(lambda x: fm.sample(analytic_fn(), x, steps=steps, cfg_scale=None,
                                    sampler=sampler, grid=grid))
  out = run(x0)
  return float(jnp.abs(out - exact_solution(x0, 1.0)).max())


def test_interpolant_endpoints_and_velocity():
  src = jnp.ones((2, 3, 4))
  tgt = 3.0 * jnp.ones((2, 3, 4))
  np.testing.assert_allclose(fm.interpolate(src, tgt, jnp.zeros(2)), src)
  np.testing.assert_allclose(fm.interpolate(src, tgt, jnp.ones(2)), SIG * src + tgt, rtol=1e-6)
  # The path is affine in t, so its finite difference is exactly the target velocity.
  t0, t1 = jnp.full(2, 0.2), jnp.full(2, 0.7)
  fd = (fm.interpolate(src, tgt, t1) - fm.interpolate(src, tgt, t0)) / 0.5
  np.testing.assert_allclose(fd, fm.target_velocity(src, tgt), rtol=1e-5)
  np.testing.assert_allclose(fm.target_velocity(src, tgt), tgt - (1 - SIG) * src)


def test_time_sampler_is_logit_normal():
  t = fm.sample_time(jax.random.PRNGKey(1), 20000)
  assert t.shape == (20000,) and float(t.min()) > 0 and float(t.max()) < 1
  logit = np.log(np.asarray(t) / (1 - np.asarray(t)))
  assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1.0) < 0.03
  # A shifted / scaled logit-normal (flowtok_stage.t_loc, t_scale) is the same draws, moved.
  moved = fm.sample_time(jax.random.PRNGKey(1), 20000, loc=-1.0, scale=0.5)
  np.testing.assert_allclose(np.log(np.asarray(moved) / (1 - np.asarray(moved))),
                             -1.0 + 0.5 * logit, rtol=1e-4, atol=1e-4)
  # A per-example location (flowtok_stage.i2t_t_loc: one for each direction).
  loc = np.where(np.arange(20000) % 2 == 0, -3.0, 0.0).astype(np.float32)
  per = np.asarray(fm.sample_time(jax.random.PRNGKey(1), 20000, loc=jnp.asarray(loc)))
  np.testing.assert_allclose(np.log(per / (1 - per)), loc + logit, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(per[1::2], np.asarray(t)[1::2])


def test_euler_first_order_and_heun_second_order(x0):
  e = [_error(x0, n, "euler") for n in (8, 16, 32)]
  h = [_error(x0, n, "heun") for n in (8, 16, 32)]
  for coarse, fine in zip(e, e[1:]):
    assert 1.7 < coarse / fine < 2.3, e
  for coarse, fine in zip(h, h[1:]):
    assert 3.2 < coarse / fine < 4.8, h
  assert h[-1] < e[-1] / 20


def test_exact_velocity_matches_closed_form(x0):
  # Sanity of the analytic flow itself: d/dt of the closed form equals the velocity field.
  t, eps = 0.4, 1e-3
  fd = (exact_solution(x0, t + eps) - exact_solution(x0, t - eps)) / (2 * eps)
  v = exact_velocity(exact_solution(x0, t), jnp.full(x0.shape[0], t))
  np.testing.assert_allclose(fd, v, atol=2e-3)


def test_parity_grid_matches_reference_loop(x0):
  n = 7
  ts = np.linspace(0, 1 - 1e-5, n)
  dt = (1 - 1e-5) / n
  x = x0
  for t in ts:
    x = x + dt * exact_velocity(x, jnp.full(x0.shape[0], t, jnp.float32))
  out = jax.jit(lambda a: fm.sample(analytic_fn(), a, steps=n, cfg_scale=None))(x0)
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)
  # And it is a different rule from the uniform grid.
  uni = fm.sample(analytic_fn(), x0, steps=n, cfg_scale=None, grid="uniform")
  assert float(jnp.abs(uni - out).max()) > 1e-3


def _two_headed(x, t, null, direction):
  """A conditional field and a distinct null field, chosen per example by `null`."""
  v_c = exact_velocity(x, t)
  v_u = -0.5 * x + 0.1
  return jnp.where(null[:, None, None] == 1, v_u, v_c)


def test_cfg_scale_one_is_the_conditional_pass(x0):
  calls = []

  def counting(x, t, null, direction):
    calls.append(x.shape[0])
    return _two_headed(x, t, null, direction)

  cond = fm.sample(analytic_fn(), x0, steps=5, cfg_scale=None)
  for s in (1.0, None):
    calls.clear()
    out = fm.sample(counting, x0, steps=5, cfg_scale=s)
    np.testing.assert_allclose(out, cond, rtol=1e-6)
    assert calls == [x0.shape[0]]  # traced once, batch B: no null pass


def test_cfg_batches_both_passes_and_matches_hand_loop(x0):
  calls = []

  def counting(x, t, null, direction):
    calls.append((x.shape[0], np.asarray(null).tolist() if not isinstance(null, jax.core.Tracer)
                  else None))
    return _two_headed(x, t, null, direction)

  s, n = 2.5, 6
  out = jax.jit(lambda a: fm.sample(counting, a, steps=n, cfg_scale=s, grid="uniform"))(x0)
  assert [c[0] for c in calls] == [2 * x0.shape[0]]  # one forward of 2B, traced once
  b = x0.shape[0]
  x = x0
  for i in range(n):
    t = jnp.full(b, i / n)
    v_c = _two_headed(x, t, jnp.zeros(b, jnp.int32), None)
    v_u = _two_headed(x, t, jnp.ones(b, jnp.int32), None)
    x = x + (v_u + s * (v_c - v_u)) / n
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


def test_direction_reaches_velocity_fn(x0):
  seen = []
  fn = analytic_fn(seen)
  run = jax.jit(lambda a: fm.sample(fn, a, steps=3, cfg_scale=2.0, direction=1))
  run(x0)
  assert len(seen) == 1 and seen[0].shape == (2 * x0.shape[0],)

  got = []

  def record(x, t, null, direction):
    got.append(direction)
    return exact_velocity(x, t)

  fm.sample(record, x0, steps=2, cfg_scale=None, direction=1)
  np.testing.assert_array_equal(got[0], np.ones(x0.shape[0]))
  got.clear()
  fm.sample(record, x0, steps=2, cfg_scale=None, direction=None)
  assert got[0] is None


def test_direction_values_change_the_result(x0):
  # A field that depends on the direction: I2T (d=1) must integrate a different ODE than T2I.
  def fn(x, t, null, direction):
    return jnp.ones_like(x) + direction[:, None, None].astype(x.dtype)

  t2i = fm.sample(fn, x0, steps=4, cfg_scale=None, direction=0)
  i2t = fm.sample(fn, x0, steps=4, cfg_scale=None, direction=1)
  # Parity grid: the steps add up to 1 - 1e-5, so a constant field v = 1 + d moves by that much.
  np.testing.assert_allclose(t2i - x0, 1 - 1e-5, rtol=1e-5)
  np.testing.assert_allclose(i2t - x0, 2 * (1 - 1e-5), rtol=1e-5)


def test_sampler_is_one_loop_program(x0):
  jaxpr = jax.make_jaxpr(lambda a: fm.sample(analytic_fn(), a, steps=20, cfg_scale=2.0,
                                             sampler="heun", grid="uniform"))(x0)
  prims = [e.primitive.name for e in jaxpr.eqns]
  assert prims.count("while") == 1 or prims.count("scan") == 1, prims


def test_bad_sampler_arguments(x0):
  with pytest.raises(UserError, match="sampler"):
    fm.sample(analytic_fn(), x0, steps=2, sampler="rk4")
  with pytest.raises(UserError, match="grid"):
    fm.sample(analytic_fn(), x0, steps=2, grid="cosine")
  with pytest.raises(UserError, match="heun"):
    fm.sample(analytic_fn(), x0, steps=2, sampler="heun", grid="parity")
  assert fm.function_evaluations(20, "euler", 2.0) == 40
  assert fm.function_evaluations(20, "heun", None) == 40


# -- null roll -------------------------------------------------------------------------------------

def test_roll_marked_hand_made():
  target = jnp.arange(8.0)[:, None] * jnp.ones((1, 3))
  mask = jnp.array([0, 1, 0, 1, 1, 0, 0, 1], bool)
  out = roll_marked(target, mask)
  # Marked rows 1, 3, 4, 7 take the targets of 3, 4, 7, 1 (the next marked row, cyclically).
  np.testing.assert_array_equal(out[:, 0], [0, 3, 2, 4, 7, 5, 6, 1])
  np.testing.assert_array_equal(out[:, 1:], out[:, :1] * jnp.ones((1, 2)))


def test_roll_marked_two_swap():
  target = jnp.arange(5.0)
  out = roll_marked(target, jnp.array([0, 0, 1, 0, 1], bool))
  np.testing.assert_array_equal(out, [0, 1, 4, 3, 2])


def _find_key(pred, b, p, num_shards=1):
  """A key whose marks (as `null_roll` draws them) satisfy `pred`, searched in one vmapped draw."""
  keys = jax.random.split(jax.random.PRNGKey(11), 512)
  all_marks = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (b,)))(keys) < p)
  for key, marked in zip(np.asarray(keys), all_marks):
    marked = marked.reshape(num_shards, -1)
    if pred(marked):
      return jnp.asarray(key), marked
  raise AssertionError("no key found")


def test_null_roll_applies_mask_and_indicator():
  b = 8
  key, marked = _find_key(lambda m: m.sum() >= 3, b, 0.4)
  target = jnp.arange(b, dtype=jnp.float32)[:, None, None] * jnp.ones((1, 2, 3))
  out, null = null_roll(key, target, p=0.4)
  idx = np.flatnonzero(marked[0])
  expected = np.arange(b, dtype=np.float32)
  expected[idx] = expected[np.roll(idx, -1)]
  np.testing.assert_array_equal(out[:, 0, 0], expected)
  np.testing.assert_array_equal(null, marked[0].astype(np.int32))
  assert null.dtype == jnp.int32


@pytest.mark.parametrize("count", [0, 1])
def test_null_roll_clears_single_mark(count):
  b = 8
  key, _ = _find_key(lambda m: m.sum() == count, b, 0.15)
  target = jax.random.normal(jax.random.PRNGKey(3), (b, 4, 2))
  out, null = null_roll(key, target, p=0.15)
  np.testing.assert_array_equal(out, target)
  np.testing.assert_array_equal(null, np.zeros(b))


def test_null_roll_marking_rate():
  b, p = 64, 0.1
  keys = jax.random.split(jax.random.PRNGKey(7), 300)
  nulls = jax.jit(jax.vmap(lambda k: fm.null_roll(k, jnp.zeros((b, 1)), p=p)[1]))(keys)
  # A batch of 64 almost never has <= 1 mark at p = 0.1 (P ≈ 0.013), so the rate stays near p.
  rate = float(nulls.mean())
  assert 0.085 < rate < 0.11, rate


def test_null_roll_never_crosses_shards():
  b, shards = 16, 4
  # Shard 0 has two marks, another shard exactly one (cleared), and at least one shard >= 2.
  key, marked = _find_key(
      lambda m: (m.sum(1) >= 2).sum() >= 2 and (m.sum(1) == 1).any(), b, 0.35, shards)
  target = jnp.arange(b, dtype=jnp.float32)
  out, null = null_roll(key, target, p=0.35, num_shards=shards)
  out = np.asarray(out).reshape(shards, -1)
  null = np.asarray(null).reshape(shards, -1)
  for s in range(shards):
    block = np.arange(b).reshape(shards, -1)[s]
    assert set(out[s]) == set(block)  # every value stays inside its own shard
    if marked[s].sum() <= 1:
      np.testing.assert_array_equal(out[s], block)
      assert null[s].sum() == 0
    else:
      np.testing.assert_array_equal(null[s], marked[s])
      idx = np.flatnonzero(marked[s])
      np.testing.assert_array_equal(out[s][idx], block[np.roll(idx, -1)])
  with pytest.raises(UserError, match="shards"):
    null_roll(key, target, num_shards=3)


def test_per_example_mse():
  a = jnp.ones((2, 3, 4))
  b = jnp.concatenate([jnp.ones((1, 3, 4)), 3 * jnp.ones((1, 3, 4))])
  np.testing.assert_allclose(fm.per_example_mse(a, b), [0.0, 4.0])


def test_null_roll_stays_within_direction_groups():
  b = 12
  groups = jnp.array([0, 1] * 6, jnp.int32)
  g = np.asarray(groups)
  key, marked = _find_key(
      lambda m: (m[0] & (g == 0)).sum() >= 2 and (m[0] & (g == 1)).sum() == 1, b, 0.4)
  target = jnp.arange(b, dtype=jnp.float32)
  roll = jax.jit(lambda k, x, gr: fm.null_roll(k, x, p=0.4, groups=gr, num_groups=2))
  out, null = roll(key, target, groups)
  out, null = np.asarray(out), np.asarray(null)
  idx0 = np.flatnonzero(marked[0] & (g == 0))
  expected = np.arange(b, dtype=np.float32)
  expected[idx0] = expected[np.roll(idx0, -1)]
  # Group 0 rolls among itself; group 1's single mark is cleared.
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(null, (marked[0] & (g == 0)).astype(np.int32))
  assert (g[out.astype(int)] == g).all()


def test_sampler_error_table_heun_beats_euler_at_equal_cost():
  rows = sampler_error.compare(nfes=(8, 16))
  for row in rows:
    assert row["heun"] < 0.3 * row["euler_uniform"], row  # 0.26x at 8 NFE, 0.11x at 16.
  # Halving the step size halves Euler's error (first order).
  assert 1.7 < rows[0]["euler_uniform"] / rows[1]["euler_uniform"] < 2.3
