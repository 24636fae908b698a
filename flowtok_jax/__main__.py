"""`python -m flowtok_jax` is the `flowtok` command."""
from flowtok_jax import cli

if __name__ == "__main__":
  cli.entry()
