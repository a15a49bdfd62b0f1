"""Benchmark of the vmapped sweep against Python loops of jitted calls.

Runs `gsparse.sweep.run_sweep` over `--points` random parameter points with
`--trials` Monte Carlo draws each, at fixed `n` and `d`, and compares its
throughput with two loops that compute the same measures one call at a time:

  * per point: one jitted call per point (trials vmapped inside the call),
  * per trial: one jitted call per (point, trial), the naive loop;
  * per point, common random numbers: the shared draws computed once, then one
    jitted call per point of the same rescaled computation the
    `common_random_numbers=True` sweep does (the fair baseline for that mode).

The sweep runs in both of its modes: independent draws per point (the
default; the same computation as the loops) over `--independent_points`
points, and `common_random_numbers=True` (one set of draws per (n, d) group,
rescaled per point, so most of the work is shared) over `--points` points.

The loops are timed on `--baseline_points` points and their throughput is
extrapolated. A dense `jax.nn.dot_product_attention` over the same number of
(query row, key) pairs is timed as a reference for the cost of attention
itself. Compilation is excluded everywhere (each path is warmed up first) and
reported separately. Prints a table and writes JSON.

  PYTHONPATH=. python scripts/bench_sweep.py --points=10000 --trials=16 --n=512 --d=64
"""

import json
import statistics
import time

from absl import app, flags

_POINTS = flags.DEFINE_integer("points", 10_000, "Number of random parameter points in the sweep.")
_TRIALS = flags.DEFINE_integer("trials", 16, "Monte Carlo draws of X per point.")
_N = flags.DEFINE_integer("n", 512, "Sequence length n (keys per attention row).")
_D = flags.DEFINE_integer("d", 64, "Input dimension d (also the head dimension h).")
_ROWS = flags.DEFINE_integer(
  "rows", 32, "Query rows measured per draw (the first rows of X; all n rows are keys)."
)
_K = flags.DEFINE_list("k", ["8", "16", "32", "64"], "Choices of k for the random points.")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "Points per jitted call; 0 = automatic.")
_BASELINE_POINTS = flags.DEFINE_integer(
  "baseline_points", 64, "Points timed for each Python-loop baseline (throughput extrapolated)."
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 3, "Timed repeats of the baselines and the dense reference (median reported)."
)
_SWEEP_REPEATS = flags.DEFINE_integer("sweep_repeats", 1, "Timed repeats of each full sweep.")
_INDEP_POINTS = flags.DEFINE_integer(
  "independent_points",
  0,
  "Points of the independent-draws sweep (0 = --points); its throughput is per point.",
)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_JSON = flags.DEFINE_string("json", "bench_sweep.json", "Where to write the results as JSON.")


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def main(argv):
  del argv
  import jax
  import numpy as np

  from gsparse import sweep

  n, d, trials, rows = _N.value, _D.value, _TRIALS.value, min(_ROWS.value, _N.value)
  ks = [int(k) for k in _K.value]
  pts = sweep.random_points(
    _SEED.value, _POINTS.value, n=[n], d=[d], sigma=(0.5, 2.5), k=ks, eps=(1e-3, 0.1)
  )
  key = jax.random.key(_SEED.value)
  chunk = _CHUNK.value or None

  # Each mode is warmed up on a prefix whose chunk shape equals the full run's.
  kw = dict(key=key, trials=trials, rows=rows, chunk_size=chunk, mesh="auto")
  ndev = jax.device_count()
  per_chunk = chunk or max(1, (1 << 18) // (trials * rows * n))  # run_sweep's default
  per_chunk = max(ndev, per_chunk // ndev * ndev)
  crn_chunk = -(-(chunk or 1024) // ndev) * ndev
  modes = {
    "independent": (False, _INDEP_POINTS.value or _POINTS.value, per_chunk),
    "crn": (True, _POINTS.value, crn_chunk),
  }
  sweeps = {}
  for mode, (crn, npts, warm_n) in modes.items():
    sub = {p: v[:npts] for p, v in pts.items()}
    warm = {p: v[: min(len(v), warm_n)] for p, v in pts.items()}
    compile_s, _ = _timed(
      lambda warm=warm, crn=crn: sweep.run_sweep(
        warm, progress=False, common_random_numbers=crn, **kw
      )
    )
    runs = []
    for _ in range(_SWEEP_REPEATS.value):
      sec, table = _timed(
        lambda sub=sub, crn=crn: sweep.run_sweep(
          sub, progress=True, common_random_numbers=crn, **kw
        )
      )
      runs.append(sec)
    assert np.all(np.isfinite(table["tail_mean"]))
    sweeps[mode] = (npts, compile_s, runs, statistics.median(runs) / npts)

  # Baselines: the same measures, one jitted call at a time.
  b = min(_BASELINE_POINTS.value, _POINTS.value)

  def per_point(b):
    for i in range(b):
      r = sweep.measure_points(
        key,
        [i],
        pts["sigma"][i : i + 1],
        pts["weight_scale"][i : i + 1],
        pts["k"][i : i + 1],
        pts["eps"][i : i + 1],
        n=n,
        d=d,
        trials=trials,
        rows=rows,
      )
      jax.device_get(r)

  def per_trial(b):
    for i in range(b):
      for t in range(trials):
        r = sweep.measure_points(
          key,
          [i * trials + t],
          pts["sigma"][i : i + 1],
          pts["weight_scale"][i : i + 1],
          pts["k"][i : i + 1],
          pts["eps"][i : i + 1],
          n=n,
          d=d,
          trials=1,
          rows=rows,
        )
        jax.device_get(r)

  # The common-random-numbers estimator one point at a time: the group's
  # shared draws computed once (as the sweep does), then one jitted call per point.
  crn_point = jax.jit(sweep.crn._crn_point, static_argnames=("n",))
  crn_ks = np.asarray(pts["k"])  # the head size the sweep uses
  head_cap = sweep.crn._crn_head_cap(crn_ks, n=n, d=d, rows=rows, trials=trials)
  base, wstats = sweep.crn._crn_base(
    sweep.measure._group_key(key, n, d), n=n, d=d, rows=rows, trials=trials,
    resample_weights=False, head_cap=head_cap,
  )  # fmt: skip

  def per_point_crn(b):
    for i in range(b):
      args = (pts["sigma"][i], pts["weight_scale"][i], pts["k"][i], pts["eps"][i])
      args = [np.float32(a) if j != 2 else np.int32(a) for j, a in enumerate(args)]
      jax.device_get(crn_point(base, wstats, *args, n=n))

  loops = {}
  for name, fn in (
    ("per_point", per_point),
    ("per_trial", per_trial),
    ("per_point_crn", per_point_crn),
  ):
    fn(1)  # warm-up: compiles this loop's call shape
    times = []
    for _ in range(_REPEATS.value):
      s, _ = _timed(lambda fn=fn: fn(b))
      times.append(s)
    loops[name] = statistics.median(times) / b  # seconds per point

  # Reference: dense attention over the same (query row, key) pairs per trial.
  batch = 256
  qk = jax.random.normal(jax.random.key(1), (3, batch, rows, 1, d))
  kv = jax.random.normal(jax.random.key(2), (2, batch, n, 1, d))
  dense = jax.jit(jax.nn.dot_product_attention)
  jax.block_until_ready(dense(qk[0], kv[0], kv[1]))
  dt = []
  for _ in range(_REPEATS.value):
    s, _ = _timed(lambda: jax.block_until_ready(dense(qk[0], kv[0], kv[1])))
    dt.append(s)
  dense_per_trial = statistics.median(dt) / batch

  res = {
    "points": _POINTS.value,
    "trials": trials,
    "n": n,
    "d": d,
    "rows_per_trial": rows,
    "devices": jax.device_count(),
    "backend": jax.default_backend(),
  }
  for mode, (npts, compile_s, runs, per_point_s) in sweeps.items():
    res[f"{mode}_points"] = npts
    res[f"{mode}_compile_and_warmup_s"] = compile_s
    res[f"{mode}_seconds_runs"] = runs
    res[f"{mode}_points_per_s"] = 1 / per_point_s
    res[f"{mode}_seconds_for_points"] = per_point_s * _POINTS.value
    res[f"{mode}_speedup_vs_per_point_loop"] = loops["per_point"] / per_point_s
    res[f"{mode}_speedup_vs_per_trial_loop"] = loops["per_trial"] / per_point_s
    if mode == "crn":  # against a loop of the same (shared-draw) estimator
      res["crn_speedup_vs_per_point_crn_loop"] = loops["per_point_crn"] / per_point_s
    res[f"{mode}_s_per_trial_over_dense_attention"] = per_point_s / trials / dense_per_trial
  res.update(
    {
      "loop_per_point_points_per_s": 1 / loops["per_point"],
      "loop_per_trial_points_per_s": 1 / loops["per_trial"],
      "loop_per_point_crn_points_per_s": 1 / loops["per_point_crn"],
      "baseline_points": b,
      "dense_attention_s_per_trial": dense_per_trial,
    }
  )
  print("| quantity | value |\n|---|---|")
  for k, v in res.items():
    print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
  with open(_JSON.value, "w") as f:
    json.dump(res, f, indent=2)
  print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
