r"""FlowTiTok at 512 px: configs/flowtitok_256.py with res=512 (32 × 32 patches, 77 × 16 tokens).

    flowtok train --config configs/flowtitok_512.py --workdir /gcs/BUCKET/runs/flowtitok_512

The reference trains its 512 px tokenizer for the third FlowTok stage; start it from the 256 px
run with `--config.init.params_from=/gcs/BUCKET/runs/flowtitok_256` (shapes match: RoPE tables
are computed, not learned, so the grid size has no parameters).
"""
import os

from flowtok_jax import config_lib


def _base():
  return config_lib.load_module(os.path.join(os.path.dirname(__file__), "flowtitok_256.py"))


def get_config(arg=None):
  return _base().get_config(f"res=512,{arg}" if arg else "res=512")


def get_sweep(add, arg=None):
  return _base().get_sweep(add, f"res=512,{arg}" if arg else "res=512")
