"""Running `flowtok` in the test process and checking its one-line errors (shared by tests)."""
from flowtok_jax import cli


def run_cli(argv, capsys):
  """(exit code, stdout, stderr) of `flowtok ARGV` run in this process."""
  try:
    code = cli.main(argv)
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def assert_one_error(code, err, *needles):
  """Exit code 2 and exactly one `flowtok: error: ...` line containing every needle."""
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith("flowtok: error: "), err
  for n in needles:
    assert n in lines[0], lines[0]
