"""Config loading, typed arguments, validated overrides and durations."""
import subprocess
import sys

import ml_collections
import pytest

from flowtok_jax import cli
from flowtok_jax import config_lib
from flowtok_jax.errors import UserError


def test_parse_arg_types_and_flags():
  arg = config_lib.parse_arg("variant=XL,runlocal,res=32,lr=0.5", variant="B", runlocal=False,
                             res=64, lr=1.0)
  assert arg.variant == "XL" and arg.runlocal is True and arg.res == 32 and arg.lr == 0.5
  defaults = config_lib.parse_arg(None, variant="B", runlocal=False)
  assert defaults.variant == "B" and defaults.runlocal is False


@pytest.mark.parametrize("arg,match", [("varaint=XL", "varaint"), ("res=abc", "res")])
def test_parse_arg_rejects_unknown_and_mistyped(arg, match):
  with pytest.raises(UserError, match=match):
    config_lib.parse_arg(arg, variant="B", res=64)


def test_load_applies_overrides_and_locks():
  config = config_lib.load("configs/demo.py:runlocal",
                           ["data.shapes.num_train=7", "data.data_dir=/tmp/d"])
  assert config.data.shapes.num_train == 7 and config.data.data_dir == "/tmp/d"
  with pytest.raises(AttributeError):
    config.data.not_a_key = 1  # Locked: typos cannot add keys later.


def test_none_unsets_an_optional_number_a_config_chose():
  config = config_lib.load("configs/demo.py", ["flowtok_stage.i2t_t_loc=None",
                                               "optim.clip_norm=0.5"])
  assert config.flowtok_stage.i2t_t_loc is None and config.optim.clip_norm == 0.5
  config = config_lib.load("configs/demo.py", ["train.ema_decay=None"])
  assert config.train.ema_decay is None
  # Strings stay strings; booleans have no None.
  assert config_lib.load("configs/demo.py", ["data.name=None"]).data.name == "None"
  with pytest.raises(UserError, match="progress_bar"):
    config_lib.load("configs/demo.py", ["train.progress_bar=None"])


@pytest.mark.parametrize("override,match", [
    ("data.shapes.num_trian=5", "num_trian.*did you mean 'num_train'"),
    ("data.shapes.num_train=five", "num_train"),
    ("data=3", "section"),
    ("nosuchkey", "key=value"),
])
def test_bad_override_is_one_line_error(override, match):
  with pytest.raises(UserError, match=match):
    config_lib.load("configs/demo.py", [override])


def test_missing_config_file():
  with pytest.raises(UserError, match="not found"):
    config_lib.load("configs/nope.py")


@pytest.mark.parametrize("body, match", [
    ("def get_config(arg=None)\n  return None\n", r"bad\.py, line 1: SyntaxError"),
    ("import ml_collections\n\ndef get_config(arg=None):\n  return ml_collections.ConfigDict(\n"
     "      dict(x=undefined_name))\n", r"bad\.py, line 5: NameError: .*undefined_name"),
    ("raise RuntimeError('boom')\n", r"bad\.py, line 1: RuntimeError: boom"),
    ("def get_config(arg=None):\n  return {'x': 1}\n", "returned dict, not an ml_collections"),
])
def test_a_config_file_that_fails_is_one_line_naming_its_line(tmp_path, body, match):
  path = tmp_path / "bad.py"
  path.write_text(body)
  with pytest.raises(UserError, match=match):
    config_lib.load(str(path))


def test_a_user_error_in_get_config_passes_through():
  with pytest.raises(UserError, match="^configs/demo.py: res must be"):
    config_lib.load("configs/demo.py:res=48")


def test_steps_units():
  c = ml_collections.ConfigDict(dict(batch_size=64, total_steps=None, total_epochs=2.5,
                                     total_examples=None))
  assert config_lib.steps("total", c, examples_per_epoch=1000) == 40  # ceil(2500 / 64)
  c.total_epochs, c.total_examples = None, 640
  assert config_lib.steps("total", c) == 10
  c.total_examples, c.total_steps = None, 123
  assert config_lib.steps("total", c) == 123
  c.total_epochs = 1
  with pytest.raises(UserError, match="exactly one"):
    config_lib.steps("total", c)


def test_cli_bad_override_exits_2_with_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "flowtok_jax", "data", "build", "--config", "configs/demo.py",
       "--data_dir", str(tmp_path), "--config.data.shapes.num_trian=5"],
      capture_output=True, text=True, check=False)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l]
  assert len(lines) == 1 and lines[0].startswith("flowtok: error:") and "num_trian" in lines[0]


def test_split_overrides_accepts_both_spellings():
  rest, overrides = cli._split_overrides(
      ["train", "--config", "c.py", "--config.a.b=1", "--config.c", "2", "--workdir", "w"])
  assert rest == ["train", "--config", "c.py", "--workdir", "w"]
  assert overrides == ["a.b=1", "c=2"]


def test_an_override_a_stage_replaces_is_named_in_a_warning(caplog):
  with caplog.at_level("WARNING"):
    config = config_lib.load("configs/demo.py", ["train.batch_size=7", "train.log_every_steps=3"])
  assert config.train.batch_size == 7
  msgs = [r.getMessage() for r in caplog.records]
  assert any("'train.batch_size'" in m and "stages.flowtok.train.batch_size" in m
             and "stages.clip.train.batch_size" in m for m in msgs), msgs
  assert not any("log_every_steps" in m for m in msgs)  # no stage sets it: no warning


@pytest.mark.parametrize("argv, needle", [
    (["bench", "pipeline", "--config", "configs/demo.py", "--batch_size", "0"], "must be >= 1"),
    (["bench", "sample", "--config", "configs/demo.py", "--cfg_scale", "nan"], "must be finite"),
    (["probe", "--bundle", "b", "--data_dir", "d", "--steps", "0"], "must be >= 1"),
    (["eval", "--bundle", "b", "--data_dir", "d", "--frechet_steps", "-5"], "must be >= 0"),
])
def test_cli_counts_and_scales_are_checked_not_defaulted(argv, needle, capsys):
  from flowtok_jax import cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("flowtok: error: ") and needle in err[0], err


@pytest.mark.parametrize("override", ["flow.depth=-1", "tokenizer.patch_size=0",
                                      "stages.clip.train.batch_size=0", "text_decoder.ffn_dim=0"])
def test_sizes_below_one_are_refused(override):
  with pytest.raises(UserError, match=f"config key {override.split('=')[0]} must be at least 1"):
    config_lib.load("configs/demo.py", [override])


def test_a_stage_override_may_name_any_shared_key_the_stage_does_not_set():
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  config = config_lib.load("configs/demo.py", ["stages.flowtok.optim.schedule=cosine",
                                               "stages.flowtok.optim.end_lr=1e-5",
                                               "stages.clip.optim.clip_norm=0.5"])
  flow = stage_api.config_for_stage(config, "flowtok")
  assert (flow.optim.schedule, flow.optim.end_lr, flow.optim.lr) == ("cosine", 1e-5, 1e-3)
  assert stage_api.config_for_stage(config, "clip").optim.clip_norm == 0.5
  assert stage_api.config_for_stage(config, "tokenizer").optim.clip_norm == 1.0  # its own
  assert config.optim.schedule == "constant" and config.optim.clip_norm is None  # shared: as set
  with pytest.raises(UserError, match="unknown config key 'stages.flowtok.optim.shedule'"):
    config_lib.load("configs/demo.py", ["stages.flowtok.optim.shedule=cosine"])
  with pytest.raises(UserError, match="stages.flowtok.optim.warmup_steps"):
    config_lib.load("configs/demo.py", ["stages.flowtok.optim.warmup_steps=soon"])


def test_a_config_file_value_of_the_wrong_type_is_one_line_naming_the_key():
  """Values a config file sets (not cast like CLI overrides) meet ml_collections' type lock when
  a stage's section is merged: a UserError naming the key, not a TypeError."""
  from flowtok_jax.train import stage_api  # pylint: disable=g-import-not-at-top
  config = config_lib.load("configs/demo.py:runlocal")
  config.stages.flowtok.train = ml_collections.ConfigDict(
      dict(config.stages.flowtok.train.to_dict(), total_steps="abc"))
  with pytest.raises(UserError, match=r"config\.stages\.flowtok\.train\.total_steps must be of "
                     r"type int, like the value it replaces \(20\), got 'abc'"):
    stage_api.config_for_stage(config, "flowtok")
  section = ml_collections.ConfigDict({"rate": 1.0})
  config_lib.set_typed(section, "rate", 2, "x")  # ints widen to floats
  assert section.rate == 2.0
