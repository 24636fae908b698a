"""A toy stage for the train-loop tests: a 2-layer MLP regresses a fixed linear teacher.

It exercises what the real stages use: logical axes on every parameter, a per-step rng (input
noise), EMA, an evaluator, a grain iterator sharded by process. Also runnable as a script, so
that subprocess tests (8 fake devices, SIGTERM) train it:

    python tests/train/toy_stage.py WORKDIR [key=value ...]   (config overrides)
"""
import os
import sys
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowtok_jax.train import optim, stage_api

IN, HIDDEN, OUT = 16, 32, 4
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("out", None))
_TEACHER = np.random.default_rng(123).normal(size=(IN, OUT)).astype(np.float32) / 4.0


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.train = ml_collections.ConfigDict(dict(
      stage="toy", batch_size=8, total_steps=12, log_every_steps=1, eval_every_steps=0,
      ckpt_every_steps=4, ema_decay=0.9, peak_flops_per_device=1e9,
      progress_bar=False, sleep_per_step=0.0))
  c.train.update(train_overrides)
  c.optim = optim.default_config()
  c.optim.lr = 3e-2
  c.optim.warmup_steps = 2
  c.optim.weight_decay = 0.0
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.sharding = ml_collections.ConfigDict(dict(rules=RULES))
  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=2, async_save=True))
  c.init = ml_collections.ConfigDict(dict(params_from=None))
  # nan_at_step: NaN data after it; nan_grad_at_step: that step's loss stays finite but its
  # gradient (so the update) is NaN.
  c.toy = ml_collections.ConfigDict(dict(hidden=HIDDEN, nan_at_step=-1, nan_grad_at_step=-1))
  return c


class MLP(nn.Module):
  hidden: int = HIDDEN

  @nn.compact
  def __call__(self, x):
    x = nn.with_logical_constraint(x, ("batch", "embed"))
    h = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("mlp",)))(x)
    h = nn.gelu(h)
    h = nn.with_logical_constraint(h, ("batch", "mlp"))
    return nn.Dense(OUT, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "out")))(h)


def _example(i):
  x = np.random.default_rng(int(i)).normal(size=(IN,)).astype(np.float32)
  return {"x": x, "y": x @ _TEACHER}


def make_iter(host_batch: int, process_index: int = 0, process_count: int = 1, seed: int = 0):
  ds = grain.MapDataset.range(4096).shuffle(seed=seed)[process_index::process_count]
  return iter(ds.map(_example).batch(host_batch, drop_remainder=True).repeat().to_iter_dataset())


@stage_api.register("toy")
def build_toy(config, ctx: stage_api.StageContext) -> stage_api.Stage:
  model = MLP(hidden=config.toy.hidden)
  opt = optim.make(config.optim, total_steps=config.train.total_steps)
  sleep = config.train.get("sleep_per_step", 0.0)
  nan_at = config.toy.nan_at_step

  nan_grad_at = config.toy.get("nan_grad_at_step", -1)

  def loss_fn(params, frozen, batch, rng, step, aux_params):
    del frozen, aux_params
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    pred = model.apply({"params": params}, x)
    loss = jnp.mean((pred - batch["y"]) ** 2)
    if nan_grad_at >= 0:  # Value + 0, gradient 0 * inf = NaN at that step only.
      m = (step == nan_grad_at).astype(jnp.float32)
      loss = loss + jnp.sqrt(m * jnp.sum(0.0 * params["Dense_0"]["kernel"]) + 1.0 - m) - (1.0 - m)
    return loss, {"pred_mean": jnp.mean(pred)}

  def eval_fn(params, frozen, step):
    del frozen, step
    b = next(make_iter(16, seed=99))
    pred = model.apply({"params": params}, b["x"])
    return stage_api.EvalResult(scalars={"mse": float(np.mean((np.asarray(pred) - b["y"])**2))})

  def train_iter():
    it = make_iter(ctx.host_batch_size, ctx.process_index, ctx.process_count, config.seed)
    return _Wrapped(it, sleep, nan_at)

  return stage_api.Stage(
      name="toy", init=lambda rng, b: model.init(rng, b["x"])["params"], loss_fn=loss_fn,
      optimizer=opt.tx, learning_rate=opt.schedule, train_iter=train_iter,
      example_batch={"x": np.zeros((1, IN), np.float32), "y": np.zeros((1, OUT), np.float32)},
      ema_decay=config.train.ema_decay,
      evaluators=[stage_api.Evaluator("toy", eval_fn, config.train.eval_every_steps)],
      flops_per_step=6.0 * config.train.batch_size * (IN * config.toy.hidden
                                                      + config.toy.hidden * OUT))


class _Wrapped(grain.DatasetIterator):
  """Slows the data (so a subprocess test can signal the run mid-way) or poisons it with NaN
  from batch `nan_at` on (a simulated divergence that leaves the compiled program unchanged)."""

  def __init__(self, it, sleep, nan_at):
    super().__init__()
    self._it, self._sleep, self._nan_at, self._n = it, sleep, nan_at, 0

  def __next__(self):
    if self._sleep:
      time.sleep(self._sleep)
    batch = next(self._it)
    self._n += 1
    if 0 <= self._nan_at < self._n:
      batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
    return batch

  def get_state(self):
    return {"inner": self._it.get_state(), "n": self._n}

  def set_state(self, state):
    self._it.set_state(state["inner"])
    self._n = state["n"]


def main(argv):
  from flowtok_jax import config_lib  # pylint: disable=g-import-not-at-top
  from flowtok_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = config_lib.apply_overrides(toy_config(), argv[2:])
  result = loop.train_and_evaluate(config, argv[1], "toy")
  print(f"RESULT step={result.step} stopped_by={result.stopped_by}", flush=True)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main(sys.argv)
