"""Writes the default gsparse report: a Markdown summary, PNG figures and the sweep as CSV.

  gsparse-report                              # into reports/latest
  gsparse-report --out=my_report --small      # a quick look at fewer points and draws

(or `python -m gsparse.cli.report`; needs matplotlib: `pip install 'gsparse-jax[report]'`).

The report draws the paper's Gaussian setting over a grid of (n, tau, k),
measures every attention row by Monte Carlo (gsparse.sweep) and sets the
measurements against the theorems of docs/theory.md (gsparse.bounds):
sparsity vs tau, top-k error vs k with the certificate, the phase diagram in
(n, tau) and an adaptive window k = alpha n^C against a fixed k. A line on
stderr announces each phase with the time since the start.
"""

import dataclasses
import os

from absl import app, flags

from gsparse.cli import _common

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the flags (in `run()`, so that importing this module defines none)."""
  flags.DEFINE_string(
    "out",
    os.path.join("reports", "latest"),
    "Folder to write summary.md, sweep.csv and the PNG figures into (created; files in it "
    "are overwritten).",
  )
  flags.DEFINE_integer("seed", 0, "PRNG seed of all Monte Carlo draws.")
  flags.DEFINE_bool(
    "small",
    False,
    "Use the small configuration (few points and draws) for a quick look.",
  )
  flags.DEFINE_integer(
    "trials",
    None,
    "Draws of X per parameter point (default: 8, or 2 with --small).",
  )
  flags.DEFINE_float("eps", None, "Sparsity threshold eps in (0, 1) (default 0.01).")
  flags.DEFINE_float(
    "delta",
    None,
    "Failure probability of the Theorem 1 and 2 bounds (default 0.01).",
  )
  flags.DEFINE_bool("progress", True, "Print a line per phase and the sweep's progress to stderr.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _common.use_agg_matplotlib("gsparse-report")
  import jax

  from gsparse import report

  config = report.ReportConfig.small() if FLAGS.small else report.ReportConfig()
  changes = {
    name: getattr(FLAGS, name)
    for name in ("trials", "eps", "delta")
    if getattr(FLAGS, name) is not None
  }
  config = dataclasses.replace(config, **changes)
  result = report.build_report(
    jax.random.key(FLAGS.seed), FLAGS.out, config=config, progress=FLAGS.progress
  )
  print(f"Report written to {os.path.abspath(result.out_dir)} ({result.seconds:.0f} s):")
  for path in (result.summary, result.csv, *result.figures):
    print(f"  {path}")


def run() -> None:
  """Console entry point `gsparse-report` (also `python -m gsparse.cli.report`)."""
  _define_flags()
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
