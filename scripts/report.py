"""Prints the default gsparse report (see gsparse/report.py)."""

from absl import app, flags

_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for the Gaussian draws.")
_EPS = flags.DEFINE_float("eps", 0.01, "Sparsity threshold eps in (0, 1).")
_K = flags.DEFINE_integer("k", 32, "Number of keys kept by top-k attention.")
_TRIALS = flags.DEFINE_integer("trials", 4, "Independent draws of (X, W) per grid point.")


def main(argv):
  del argv
  import jax

  from gsparse import report

  rows = report.sparsity_table(
    jax.random.key(_SEED.value), eps=_EPS.value, k=_K.value, trials=_TRIALS.value
  )
  print(report.format_table(rows))


if __name__ == "__main__":
  app.run(main)
