"""The command line's argument errors: one line naming the command whose --help to read."""
import pytest

from tests.cli_run import assert_one_error, run_cli


@pytest.mark.parametrize("argv, needles", [
    # Top level: the message once, not "flowtok: error: flowtok: ...".
    (["nosuch"], ("invalid choice: 'nosuch'", "(see flowtok --help)")),
    ([], ("required: command", "(see flowtok --help)")),
    # A subcommand's unknown flag points at that subcommand's help, not the top level's.
    (["caption", "--bundle", "b", "--image", "x.png"],
     ("flowtok caption: unrecognized arguments: --image", "(see flowtok caption --help)")),
    (["generate", "--bundle", "b", "--out", "o"],
     ("flowtok generate: the following arguments are required: --prompt",
      "(see flowtok generate --help)")),
])
def test_argument_errors_name_the_command(argv, needles, capsys):
  code, _, err = run_cli(argv, capsys)
  assert_one_error(code, err, *needles)
  assert not err.startswith("flowtok: error: flowtok: "), err
