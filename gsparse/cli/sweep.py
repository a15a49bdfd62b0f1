"""Runs a Monte Carlo sweep of attention sparsity and writes it as CSV.

  gsparse-sweep --n=256,1024 --d=64 --sigma=0.5,1,2 --k=8,32 --eps=0.01 \
      --trials=16 --out=sweep.csv
  gsparse-sweep --random=1000 --n=512 --d=64 --sigma=0.5,2.5 --k=8,16,32 \
      --eps=0.001,0.1 --out=random.csv

Each point draws its weights once and --trials inputs X ~ N(0, sigma^2 I); see
gsparse/sweep.py for the measured columns. Several devices (GPUs, a TPU
slice, or CPU devices forced with XLA_FLAGS) are used automatically.
"""

from absl import flags

from gsparse.cli import _common

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the flags (in `run()`, so that importing this module defines none)."""
  flags.DEFINE_list("n", ["256"], "Sequence lengths n (grid values, or choices with --random).")
  flags.DEFINE_list("d", ["64"], "Input dimensions d = head dimension h (grid values/choices).")
  flags.DEFINE_list(
    "sigma",
    ["1.0"],
    "Input scales sigma (grid values; with --random: the range low,high).",
  )
  flags.DEFINE_list(
    "weight_scale",
    [],
    "Weight entry scales (grid values; with --random: the range low,high). Empty: 1/sqrt(d).",
  )
  flags.DEFINE_list("k", ["32"], "Numbers of kept keys k, each <= n (grid values/choices).")
  flags.DEFINE_list(
    "eps",
    ["0.01"],
    "Sparsity thresholds eps in (0, 1) (grid values; with --random: low,high).",
  )
  flags.DEFINE_integer(
    "random",
    0,
    "If > 0, draw this many random points instead of the grid (log-uniform floats).",
  )
  flags.DEFINE_integer("trials", 16, "Monte Carlo draws of X per point.")
  flags.DEFINE_integer(
    "rows",
    None,
    "Query rows measured per draw (the first rows of X); default: all n.",
  )
  flags.DEFINE_bool(
    "resample_weights",
    False,
    "Redraw the weights in every draw (default: once per point).",
  )
  flags.DEFINE_bool(
    "common_random_numbers",
    False,
    "Share one set of draws among all points of an (n, d) group, rescaled by each point's sigma "
    "and weight scale: points are correlated (their differences less noisy) and the sweep is "
    "about 6x faster (n = 512, d = 64). Default: independent draws per point.",
  )
  flags.DEFINE_integer("chunk_size", None, "Points per jitted call (default: automatic).")
  flags.DEFINE_integer("seed", 0, "PRNG seed (and the seed of --random's parameter draw).")
  flags.DEFINE_string("out", "sweep.csv", "CSV file to write.")
  flags.DEFINE_bool(
    "no_sharding",
    False,
    "Use one device even when several are present.",
  )


def main(argv):
  del argv
  import time

  import jax

  from gsparse import sweep

  ints = lambda v: [int(x) for x in v]
  floats = lambda v: [float(x) for x in v]
  if FLAGS.random > 0:
    ws = tuple(floats(FLAGS.weight_scale)) or None
    pts = sweep.random_points(
      FLAGS.seed,
      FLAGS.random,
      n=ints(FLAGS.n),
      d=ints(FLAGS.d),
      sigma=tuple(floats(FLAGS.sigma)),
      k=ints(FLAGS.k),
      eps=tuple(floats(FLAGS.eps)),
      weight_scale=ws,
    )
  else:
    pts = sweep.grid(
      n=ints(FLAGS.n),
      d=ints(FLAGS.d),
      sigma=floats(FLAGS.sigma),
      k=ints(FLAGS.k),
      eps=floats(FLAGS.eps),
      weight_scale=floats(FLAGS.weight_scale) or None,
    )
  start = time.perf_counter()
  table = sweep.run_sweep(
    pts,
    key=jax.random.key(FLAGS.seed),
    trials=FLAGS.trials,
    rows=FLAGS.rows,
    resample_weights=FLAGS.resample_weights,
    common_random_numbers=FLAGS.common_random_numbers,
    chunk_size=FLAGS.chunk_size,
    mesh=None if FLAGS.no_sharding else "auto",
  )
  table.to_csv(FLAGS.out)
  print(
    f"{len(table)} points x {FLAGS.trials} draws on {jax.device_count()} device(s) in "
    f"{time.perf_counter() - start:.1f} s; wrote {FLAGS.out}"
  )


def run() -> None:
  """Console entry point `gsparse-sweep` (also `python -m gsparse.cli.sweep`)."""
  _define_flags()
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
