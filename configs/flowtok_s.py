r"""FlowTok-S: configs/flowtok.py with variant=S (see there for every key).

    flowtok info --config configs/flowtok_s.py
    flowtok train --config configs/flowtok_s.py --workdir /gcs/BUCKET/runs/flowtok_s

Arguments (after a colon) are passed on to flowtok.py, e.g. `runlocal`.
"""
import os

from flowtok_jax import config_lib


def _base():
  return config_lib.load_module(os.path.join(os.path.dirname(__file__), "flowtok.py"))


def get_config(arg=None):
  return _base().get_config(f"variant=S,{arg}" if arg else "variant=S")


def get_sweep(add, arg=None):
  return _base().get_sweep(add, f"variant=S,{arg}" if arg else "variant=S")
