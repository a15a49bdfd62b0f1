"""Writes the default gsparse report: a Markdown summary, PNG figures and the sweep as CSV.

  python scripts/report.py                 # into reports/latest (about 3 minutes on 2 CPU cores)
  python scripts/report.py --out=my_report --small   # a quick look (seconds to a minute)

The report draws the paper's Gaussian setting over a grid of (n, tau, k),
measures every attention row by Monte Carlo (gsparse.sweep) and sets the
measurements against the theorems of docs/theory.md (gsparse.bounds):
sparsity vs tau, top-k error vs k with the certificate, the phase diagram in
(n, tau) and an adaptive window k = alpha n^C against a fixed k.
"""

import os

from absl import app, flags

_OUT = flags.DEFINE_string(
  "out",
  os.path.join("reports", "latest"),
  "Folder to write summary.md, sweep.csv and the PNG figures into (created; files in it "
  "are overwritten).",
)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of all Monte Carlo draws.")
_SMALL = flags.DEFINE_bool(
  "small",
  False,
  "Use the small configuration (few points and draws) for a quick look.",
)
_TRIALS = flags.DEFINE_integer(
  "trials",
  None,
  "Draws of X per parameter point (default: 8, or 2 with --small).",
)
_EPS = flags.DEFINE_float("eps", None, "Sparsity threshold eps in (0, 1) (default 0.01).")
_DELTA = flags.DEFINE_float(
  "delta",
  None,
  "Failure probability of the Theorem 1 and 2 bounds (default 0.01).",
)
_TABLE_ONLY = flags.DEFINE_bool(
  "table_only",
  False,
  "Only print the sparsity table of the first report (no sweep, no files).",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Print sweep progress to stderr.")


def main(argv):
  del argv
  import dataclasses
  import time

  import jax
  import matplotlib

  matplotlib.use("Agg")  # files only, no display needed

  from gsparse import report

  key = jax.random.key(_SEED.value)
  config = report.ReportConfig.small() if _SMALL.value else report.ReportConfig()
  changes = {
    name: flag.value
    for name, flag in (("trials", _TRIALS), ("eps", _EPS), ("delta", _DELTA))
    if flag.value is not None
  }
  config = dataclasses.replace(config, **changes)
  if _TABLE_ONLY.value:
    rows = report.sparsity_table(key, eps=config.eps, k=config.k, trials=config.table_trials)
    print(report.format_table(rows))
    return
  start = time.perf_counter()
  result = report.build_report(key, _OUT.value, config=config, progress=_PROGRESS.value)
  print(
    f"Report written to {os.path.abspath(result.out_dir)} ({time.perf_counter() - start:.0f} s):"
  )
  for path in (result.summary, result.csv, *result.figures):
    print(f"  {path}")


if __name__ == "__main__":
  app.run(main)
