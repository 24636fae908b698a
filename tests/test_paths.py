"""Paths the user asks us to write are checked before any work: one error line, not a traceback."""
import os

import pytest

from cli_run import assert_one_error, run_cli
from flowtok_jax import cli
from flowtok_jax import paths
from flowtok_jax.errors import UserError


def test_writable_dir_and_file(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  assert paths.writable_dir(str(tmp_path / "new" / "deeper"), "--out") == str(
      tmp_path / "new" / "deeper")
  assert not os.path.exists(tmp_path / "new")  # Checked, not created.
  with pytest.raises(UserError, match="^--out .*afile is a file; give a directory$"):
    paths.writable_dir(str(afile), "--out")
  with pytest.raises(UserError, match=r"^--workdir .*afile/w/x: .*afile is a file, not a dir"):
    paths.writable_dir(str(afile / "w" / "x"), "--workdir")
  with pytest.raises(UserError, match="is a directory; give a file path"):
    paths.writable_file(str(tmp_path), "--out")
  with pytest.raises(UserError, match="afile is a file, not a directory"):
    paths.writable_file(str(afile / "m.model"), "--out")
  assert paths.writable_file(str(tmp_path / "m.model"), "--out") == str(tmp_path / "m.model")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_dirs(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    with pytest.raises(UserError, match="not writable"):
      paths.writable_dir(str(ro), "--out")
    with pytest.raises(UserError, match="not writable"):
      paths.writable_dir(str(ro / "sub"), "--out")
    assert paths.writable_dir(str(ro), "data dir", existing_may_be_read_only=True) == str(ro)
  finally:
    ro.chmod(0o755)


def test_cli_output_under_a_file_is_one_line_before_any_work(tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("x")
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py:runlocal")
  for argv in (["data", "build", "--config", config, "--data_dir", str(afile / "d")],
               ["data", "text_tokenizer", "--config", config, "--data_dir", str(tmp_path),
                "--out", str(afile / "t.model")],
               ["demo", "--workdir", str(afile / "w"), "--config", config],
               ["train", "--config", config, "--workdir", str(afile)]):
    code, out, err = run_cli(argv, capsys)
    assert_one_error(code, err, "afile")
    assert not out  # Nothing ran (TFDS prints its progress to stdout).


def test_an_unforeseen_path_error_is_still_one_line(monkeypatch, capsys):
  def info(args, overrides):
    raise NotADirectoryError(20, "Not a directory", "/some/file/below")
  monkeypatch.setitem(cli._COMMANDS, "info", (*cli._COMMANDS["info"][:2], info))  # pylint: disable=protected-access
  code, _, err = run_cli(["info", "--config", "configs/demo.py"], capsys)
  assert_one_error(code, err, "Not a directory: /some/file/below")


def test_urls_and_empty_paths_are_refused():
  # Files are read and written with file-system calls: a bucket is used through its mount.
  for fn, what in ((paths.writable_dir, "--workdir"), (paths.writable_file, "--out"),
                   (paths.local, "checkpoint")):
    with pytest.raises(UserError, match=f"{what} gs://bucket/x: object-store URLs .* mount"):
      fn("gs://bucket/x", what)
  for bad in ("", None):
    with pytest.raises(UserError, match="--out is empty"):
      paths.writable_dir(bad, "--out")
