r"""FlowTok-B: configs/flowtok.py with variant=B (see there for every key).

    flowtok info --config configs/flowtok_b.py
    flowtok train --config configs/flowtok_b.py --workdir /gcs/BUCKET/runs/flowtok_b

Arguments (after a colon) are passed on to flowtok.py, e.g. `runlocal`.
"""
import os

from flowtok_jax import config_lib


def _base():
  return config_lib.load_module(os.path.join(os.path.dirname(__file__), "flowtok.py"))


def get_config(arg=None):
  return _base().get_config(f"variant=B,{arg}" if arg else "variant=B")


def get_sweep(add, arg=None):
  return _base().get_sweep(add, f"variant=B,{arg}" if arg else "variant=B")
