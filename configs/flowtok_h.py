r"""FlowTok-H: configs/flowtok.py with variant=H (see there for every key).

    flowtok info --config configs/flowtok_h.py
    flowtok train --config configs/flowtok_h.py --workdir /gcs/BUCKET/runs/flowtok_h

Arguments (after a colon) are passed on to flowtok.py, e.g. `runlocal`.
"""
import os

from flowtok_jax import config_lib


def _base():
  return config_lib.load_module(os.path.join(os.path.dirname(__file__), "flowtok.py"))


def get_config(arg=None):
  return _base().get_config(f"variant=H,{arg}" if arg else "variant=H")


def get_sweep(add, arg=None):
  return _base().get_sweep(add, f"variant=H,{arg}" if arg else "variant=H")
