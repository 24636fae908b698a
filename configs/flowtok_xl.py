r"""FlowTok-XL: configs/flowtok.py with variant=XL (see there for every key).

    flowtok info --config configs/flowtok_xl.py
    flowtok train --config configs/flowtok_xl.py --workdir /gcs/BUCKET/runs/flowtok_xl

Arguments (after a colon) are passed on to flowtok.py, e.g. `runlocal`.
"""
import os

from flowtok_jax import config_lib


def _base():
  return config_lib.load_module(os.path.join(os.path.dirname(__file__), "flowtok.py"))


def get_config(arg=None):
  return _base().get_config(f"variant=XL,{arg}" if arg else "variant=XL")


def get_sweep(add, arg=None):
  return _base().get_sweep(add, f"variant=XL,{arg}" if arg else "variant=XL")
