"""Helpers shared by the command-line programs."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags

MATPLOTLIB_MISSING = (
  "{what} needs matplotlib, which is an optional dependency of gsparse: "
  "pip install 'gsparse-jax[report]' (or pip install matplotlib)"
)


def use_agg_matplotlib(what: str) -> None:
  """Selects matplotlib's file-only Agg backend, or stops with how to install matplotlib.

  Called before any work starts, so a missing matplotlib is reported at once
  rather than after a long sweep.
  """
  if importlib.util.find_spec("matplotlib") is None:
    sys.exit(MATPLOTLIB_MISSING.format(what=what))  # status 1, the message on stderr
  import matplotlib

  matplotlib.use("Agg")  # files only, no display needed


def run_app(main: Callable[[list[str]], Any], module_name: str) -> None:
  """`absl.app.run(main)` with the program's docstring and flags in `--help`.

  absl's `--help` shows the docstring of `__main__` and the flags of the
  module named by `sys.argv[0]`. Run as a console command or through a
  wrapper script, neither is the module `module_name` that defines the
  program; this makes its docstring (when `__main__` has none) and its key
  flags those of the main module.
  """
  if module_name != "__main__":
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules["__main__"]
    if not getattr(main_module, "__doc__", None):
      main_module.__doc__ = sys.modules[module_name].__doc__
  app.run(main)
