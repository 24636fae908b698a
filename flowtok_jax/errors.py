"""The one exception type for bad user input.

Anything raised as `UserError` reaches the command line as a single line
`flowtok: error: <message>` and exit code 2, never as a traceback.
"""


class UserError(Exception):
  """Bad input from the user: config, flags, files, prompts, images."""
