"""launch/sweep.py: get_sweep expansion, validation before launch, commands, running."""
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from flowtok_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_sweep():
  spec = importlib.util.spec_from_file_location("flowtok_sweep",
                                                os.path.join(REPO, "launch", "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep()


def _config(tmp_path, body: str) -> str:
  path = tmp_path / "exp.py"
  path.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.optim = ml_collections.ConfigDict(dict(lr=1e-3, b2=0.95))\n"
      "  c.train = ml_collections.ConfigDict(dict(batch_size=8, mesh=(1, -1, 1)))\n"
      "  c.arg = arg or ''\n"
      "  return c\n" + body)
  return str(path)


def test_expansion_names_overrides_and_commands(tmp_path):
  cfg = _config(tmp_path, (
      "def get_sweep(add, arg=None):\n"
      "  for lr in (1e-4, 3e-4):\n"
      "    for bs in (16, 32):\n"
      "      add(**{'optim.lr': lr, 'train.batch_size': bs})\n"
      "  add(**{'train.mesh': (2, 2, 1)})\n"))
  runs = sweep.expand(cfg + ":x=1")
  assert [r.name for r in runs] == ["lr=0.0001-batch_size=16", "lr=0.0001-batch_size=32",
                                    "lr=0.0003-batch_size=16", "lr=0.0003-batch_size=32",
                                    "mesh=(2,2,1)"]
  lines = sweep.commands(cfg + ":x=1", runs, "gs://b/root/", extra=["--stage", "flowtok"])
  argv = shlex.split(lines[1])
  assert argv[1:] == [os.path.join("launch", "train.py"), "--config", cfg + ":x=1",
                      "--workdir", "gs://b/root/lr=0.0001-batch_size=32",
                      "--config.optim.lr=0.0001", "--config.train.batch_size=32",
                      "--stage", "flowtok"]
  # A tuple override round-trips through config_lib's parser.
  assert shlex.split(lines[4])[-3] == "--config.train.mesh=(2, 2, 1)"


def test_every_run_is_validated_before_anything_starts(tmp_path):
  cfg = _config(tmp_path, (
      "def get_sweep(add, arg=None):\n"
      "  add(**{'optim.lr': 1e-4})\n"
      "  add(**{'optim.lrr': 1e-4})\n"))
  with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'.*did you mean 'lr'"):
    sweep.expand(cfg)
  started = []
  assert sweep.main(["--config", cfg], run_command=started.append) == 2
  assert not started


@pytest.mark.parametrize("body,msg", [
    ("", "defines no get_sweep"),
    ("def get_sweep(add, arg=None):\n  pass\n", "added no runs"),
    ("def get_sweep(add, arg=None):\n  add(**{'optim.lr': 1})\n  add(**{'optim.lr': 1})\n",
     "several runs are named 'lr=1'"),
    ("def get_sweep(add, arg=None):\n  for lr in lrs:\n    add(**{'optim.lr': lr})\n",
     r"line \d+: NameError: name 'lrs'"),
])
def test_bad_sweeps_are_user_errors(tmp_path, body, msg):
  with pytest.raises(UserError, match=msg):
    sweep.expand(_config(tmp_path, body))


def test_runs_in_order_and_stops_at_the_first_failure(tmp_path, capsys):
  cfg = _config(tmp_path, (
      "def get_sweep(add, arg=None):\n"
      "  for b2 in (0.9, 0.95, 0.99):\n"
      "    add(**{'optim.b2': b2})\n"))
  seen = []
  rc = sweep.main(["--config", cfg, "--command", "echo {name}"],
                  run_command=lambda line: seen.append(line) or (3 if len(seen) == 2 else 0))
  assert rc == 3 and seen == ["echo b2=0.9", "echo b2=0.95"]
  seen.clear()
  rc = sweep.main(["--config", cfg, "--command", "echo {name}", "--keep_going"],
                  run_command=lambda line: seen.append(line) or (3 if len(seen) == 2 else 0))
  assert rc == 3 and len(seen) == 3
  assert "run 2 failed with exit code 3" in capsys.readouterr().err


@pytest.mark.parametrize("config,count,key", [
    ("configs/flowtok_xl.py", 3, "--config.optim.lr="),
    ("configs/flowtok.py:variant=B,sweep=batch", 4, "--config.train.batch_size="),
    ("configs/flowtok_h.py:sweep=cfg", 5, "--config.sample.cfg_scale="),
    ("configs/flowtitok_512.py", 3, "--config.optim.lr="),
    ("configs/i2t_coco.py", 3, "--config.flowtok_stage.p_i2t="),
])
def test_project_sweeps_expand(config, count, key):
  runs = sweep.expand(os.path.join(REPO, config))
  lines = sweep.commands(config, runs, "runs/sw")
  assert len(lines) == count and all(key in line for line in lines)


def test_dry_run_cli_prints_commands():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "sweep.py"), "--config",
       "configs/flowtok_s.py:sweep=lr", "--workdir_root", "gs://bucket/s", "--dry_run"],
      cwd=REPO, capture_output=True, text=True, check=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.splitlines()
  assert len(out) == 3
  assert out[0].endswith("--config configs/flowtok_s.py:sweep=lr --workdir gs://bucket/s/lr=0.0002 "
                         "--config.optim.lr=0.0002")
