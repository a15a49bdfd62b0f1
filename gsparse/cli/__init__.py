"""The command-line programs of gsparse (absl apps).

Installed as console commands, or run as modules without installing:

  gsparse-report         python -m gsparse.cli.report          the default report
  gsparse-sweep          python -m gsparse.cli.sweep           a Monte Carlo sweep to CSV
  gsparse-train          python -m gsparse.cli.train           the byte-level LM experiment
  gsparse-train-compare  python -m gsparse.cli.train_compare   every variant, several seeds
  gsparse-verify-bounds  python -m gsparse.cli.verify_bounds   Theorems 1-2 against Monte Carlo
  gsparse-atlas          python -m gsparse.atlas               sparsity atlas of a trained LM

Each module defines its absl flags when imported, so import one program per
process (its `run()` is the console entry point). `scripts/*.py` in a clone
are thin wrappers around these modules.
"""
