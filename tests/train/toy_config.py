"""Config file for `flowtok train` tests: the toy stage of toy_stage.py (registered on import)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_stage  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  del arg
  return toy_stage.toy_config()
