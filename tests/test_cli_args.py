"""The command line's argument errors: one line naming the command whose --help to read."""
import os
import pathlib
import subprocess
import sys

import pytest

from flowtok_jax import cli
from tests.cli_run import assert_one_error, run_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, needles", [
    # Top level: the message once, not "flowtok: error: flowtok: ...".
    (["nosuch"], ("invalid choice: 'nosuch'", "(see flowtok --help)")),
    ([], ("required: command", "(see flowtok --help)")),
    # A subcommand's unknown flag points at that subcommand's help, not the top level's.
    (["caption", "--bundle", "b", "--image", "x.png"],
     ("flowtok caption: unrecognized arguments: --image", "(see flowtok caption --help)")),
    (["generate", "--bundle", "b", "--out", "o"],
     ("generate needs --prompt TEXT or --prompts_file FILE", "(see flowtok generate --help)")),
    # `--config.key VALUE` must not swallow the next flag as its value.
    (["train", "--config", f"{REPO}/configs/demo.py:runlocal", "--config.train.batch_size",
      "--workdir", "w"], ("--config.train.batch_size needs a value",
                          "--config.train.batch_size=VALUE")),
    (["info", "--config", f"{REPO}/configs/demo.py:runlocal", "--config.=3"], ("empty key",)),
    (["info", "--config", f"{REPO}/configs/demo.py:runlocal", "--config.train..seed=3"], ("empty key",)),
])
def test_argument_errors_name_the_command(argv, needles, capsys):
  code, _, err = run_cli(argv, capsys)
  assert_one_error(code, err, *needles)
  assert not err.startswith("flowtok: error: flowtok: "), err


def test_cpu_when_no_accelerator_is_visible(monkeypatch, tmp_path):
  # libtpu would otherwise probe for a TPU on every command and spill its errors on stderr.
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert cli._cpu_unless_accelerator(nodes=(str(tmp_path / "accel*"),))
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  # A user's choice stands.
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not cli._cpu_unless_accelerator(nodes=(str(tmp_path / "accel*"),))
  assert os.environ["JAX_PLATFORMS"] == "tpu,cpu"
  # So does JAX's own when a chip's device node is there.
  monkeypatch.delenv("JAX_PLATFORMS")
  (tmp_path / "accel0").touch()
  assert not cli._cpu_unless_accelerator(nodes=(str(tmp_path / "accel*"),))
  assert "JAX_PLATFORMS" not in os.environ


def test_malloc_tuning_environment():
  tuned = cli.malloc_environ({"A": "1"}, "linux")
  assert tuned == {"A": "1", "GLIBC_TUNABLES": cli.MALLOC_TUNABLE}
  # The user's other tunables stay; a run that has it (the re-run itself) is left alone.
  assert (cli.malloc_environ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, "linux")["GLIBC_TUNABLES"]
          == "glibc.pthread.rseq=0:" + cli.MALLOC_TUNABLE)
  assert cli.malloc_environ(tuned, "linux") is None
  assert cli.malloc_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux") is None
  assert cli.malloc_environ({cli.NO_MALLOC_TUNING: "1"}, "linux") is None
  assert cli.malloc_environ({}, "darwin") is None


def test_the_program_reexecutes_itself_with_the_tuned_malloc(monkeypatch, capsys):
  calls = []

  def execve(path, argv, env):
    calls.append((path, argv, env))
    raise OSError("not here")  # Then it runs in this process, untuned.

  monkeypatch.setattr(os, "execve", execve)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(cli.NO_MALLOC_TUNING, raising=False)
  monkeypatch.setattr(sys, "argv", ["flowtok", "--help"])
  monkeypatch.setattr(sys, "orig_argv", [sys.executable, "/bin/flowtok", "--help"])
  with pytest.raises(SystemExit):
    cli.entry()
  assert "usage: flowtok" in capsys.readouterr().out
  if sys.platform.startswith("linux"):
    (path, argv, env), = calls
    assert path == sys.executable and argv == [sys.executable, "/bin/flowtok", "--help"]
    assert env["GLIBC_TUNABLES"] == cli.MALLOC_TUNABLE
  # The re-run does not re-execute again.
  calls.clear()
  monkeypatch.setenv("GLIBC_TUNABLES", cli.MALLOC_TUNABLE)
  with pytest.raises(SystemExit):
    cli.entry()
  assert not calls


def test_no_tpu_noise_without_a_tpu():
  # What main() does first, then the first device query, in a clean process (libtpu is
  # installed with the test extra): stderr stays empty and JAX runs on the CPU.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = ("from flowtok_jax import cli; cli._cpu_unless_accelerator(); import jax; "
          "print(jax.devices()[0].platform)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "cpu" and not proc.stderr.strip(), proc.stderr


def test_a_refused_command_leaves_no_empty_directory(tmp_path, capsys):
  demo = f"{REPO}/configs/demo.py:runlocal"
  # No text tokenizer for this workdir: refused after the loop made the workdir.
  code, _, err = run_cli(["train", "--config", demo, "--workdir", str(tmp_path / "new" / "w")],
                         capsys)
  assert_one_error(code, err, "no text tokenizer model found")
  # export refuses a missing workdir; its --out (and the missing parent) must not stay behind.
  code, _, err = run_cli(["export", "--workdir", str(tmp_path / "none"),
                          "--out", str(tmp_path / "b" / "bundle")], capsys)
  assert_one_error(code, err, "no workdir at")
  assert sorted(os.listdir(tmp_path)) == []
  # A directory that existed, or holds a file, is left alone.
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "notes.txt").write_text("mine")
  code, _, err = run_cli(["train", "--config", demo, "--workdir", str(tmp_path / "old")], capsys)
  assert_one_error(code, err, "no text tokenizer model found")
  assert os.listdir(tmp_path / "old") == ["notes.txt"]


def test_help_shows_defaults_once(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["probe", "--help"])
  assert e.value.code == 0
  out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines.
  assert "examples probed (default: 128)" in out  # A default the help did not state.
  assert "(default: the bundle's)" in out and "(default: the bundle's) (default" not in out
  assert "(default: None)" not in out and "(default: False)" not in out
