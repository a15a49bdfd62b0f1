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

_N = flags.DEFINE_list("n", ["256"], "Sequence lengths n (grid values, or choices with --random).")
_D = flags.DEFINE_list("d", ["64"], "Input dimensions d = head dimension h (grid values/choices).")
_SIGMA = flags.DEFINE_list(
  "sigma",
  ["1.0"],
  "Input scales sigma (grid values; with --random: the range low,high).",
)
_WEIGHT_SCALE = flags.DEFINE_list(
  "weight_scale",
  [],
  "Weight entry scales (grid values; with --random: the range low,high). Empty: 1/sqrt(d).",
)
_K = flags.DEFINE_list("k", ["32"], "Numbers of kept keys k, each <= n (grid values/choices).")
_EPS = flags.DEFINE_list(
  "eps",
  ["0.01"],
  "Sparsity thresholds eps in (0, 1) (grid values; with --random: low,high).",
)
_RANDOM = flags.DEFINE_integer(
  "random",
  0,
  "If > 0, draw this many random points instead of the grid (log-uniform floats).",
)
_TRIALS = flags.DEFINE_integer("trials", 16, "Monte Carlo draws of X per point.")
_ROWS = flags.DEFINE_integer(
  "rows",
  None,
  "Query rows measured per draw (the first rows of X); default: all n.",
)
_RESAMPLE = flags.DEFINE_bool(
  "resample_weights",
  False,
  "Redraw the weights in every draw (default: once per point).",
)
_CRN = flags.DEFINE_bool(
  "common_random_numbers",
  False,
  "Share one set of draws among all points of an (n, d) group, rescaled by each point's sigma "
  "and weight scale: points are correlated (their differences less noisy) and the sweep is "
  "about 6x faster (n = 512, d = 64). Default: independent draws per point.",
)
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Points per jitted call (default: automatic).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed (and the seed of --random's parameter draw).")
_OUT = flags.DEFINE_string("out", "sweep.csv", "CSV file to write.")
_NO_SHARDING = flags.DEFINE_bool(
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
  if _RANDOM.value > 0:
    ws = tuple(floats(_WEIGHT_SCALE.value)) or None
    pts = sweep.random_points(
      _SEED.value,
      _RANDOM.value,
      n=ints(_N.value),
      d=ints(_D.value),
      sigma=tuple(floats(_SIGMA.value)),
      k=ints(_K.value),
      eps=tuple(floats(_EPS.value)),
      weight_scale=ws,
    )
  else:
    pts = sweep.grid(
      n=ints(_N.value),
      d=ints(_D.value),
      sigma=floats(_SIGMA.value),
      k=ints(_K.value),
      eps=floats(_EPS.value),
      weight_scale=floats(_WEIGHT_SCALE.value) or None,
    )
  start = time.perf_counter()
  table = sweep.run_sweep(
    pts,
    key=jax.random.key(_SEED.value),
    trials=_TRIALS.value,
    rows=_ROWS.value,
    resample_weights=_RESAMPLE.value,
    common_random_numbers=_CRN.value,
    chunk_size=_CHUNK.value,
    mesh=None if _NO_SHARDING.value else "auto",
  )
  table.to_csv(_OUT.value)
  print(
    f"{len(table)} points x {_TRIALS.value} draws on {jax.device_count()} device(s) in "
    f"{time.perf_counter() - start:.1f} s; wrote {_OUT.value}"
  )


def run() -> None:
  """Console entry point `gsparse-sweep` (also `python -m gsparse.cli.sweep`)."""
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
