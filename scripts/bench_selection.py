"""Benchmarks the top-k selections against jax.nn.dot_product_attention.

For each n and k: time (median of --repeats runs after compilation and one
untimed run) of dense attention and of top-k attention with each selection,
the ratio to dense, peak memory (XLA's compiled memory analysis, and for
--rss_sizes the peak RSS of a fresh subprocess), output error against exact
dense attention and recall of the exact top-k, both on --eval_rows random query
rows. Two inputs: "planted" (each query's top-k is a planted group of keys;
used for timing and recall) and "gaussian" (the paper's setting with large tau:
error of each selection against the certificate of the exact top-k).

  PYTHONPATH=. python scripts/bench_selection.py --quick
  PYTHONPATH=. python scripts/bench_selection.py --out=bench_selection.json
"""

import json

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["4096", "16384", "65536", "131072"], "Sequence lengths n.")
_KS = flags.DEFINE_list("ks", ["32", "128"], "Numbers of kept keys k.")
_D = flags.DEFINE_integer("head_dim", 64, "Head dimension d (one head, float32).")
_SELECTIONS = flags.DEFINE_list(
  "selections", ["exact", "block", "lsh"], "Selections to run (default configs)."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per configuration (median reported).")
_LONG_N = flags.DEFINE_integer(
  "long_n", 131072, "From this n on, use --long_repeats timed runs (one run is ~a minute)."
)
_LONG_REPEATS = flags.DEFINE_integer("long_repeats", 1, "Timed runs for n >= --long_n.")
_MAX_DENSE = flags.DEFINE_integer(
  "max_dense_n", 16384, "Largest n at which dense attention runs as one call."
)
_MAX_CHUNKED = flags.DEFINE_integer(
  "max_chunked_dense_n",
  65536,
  "Largest n at which dense runs at all, as jax.nn.dot_product_attention over query chunks "
  "of --dense_chunk rows (one call would need an n*n*4-byte logit matrix). Above it dense is "
  "not run and its time is estimated as the largest measured time scaled by n^2.",
)
_DENSE_CHUNK = flags.DEFINE_integer("dense_chunk", 2048, "Query chunk for the chunked dense run.")
_EVAL_ROWS = flags.DEFINE_integer(
  "eval_rows", 512, "Query rows on which error and recall are measured."
)
_NOISE = flags.DEFINE_float(
  "planted_noise",
  0.1,
  "Noise of the planted groups (0.1: keys ~8 degrees from their centre; 0.3: ~23 degrees).",
)
_SIGMA = flags.DEFINE_float("sigma", 2.0, "Input std of the Gaussian input (tau ~ sigma^2).")
_RSS_SIZES = flags.DEFINE_list(
  "rss_sizes", ["131072"], "Sizes at which each selection's peak RSS is measured in a subprocess."
)
_TARGET = flags.DEFINE_bool("target", True, "Also run the exact target case n=8192, k=64.")
_INTERLEAVE = flags.DEFINE_bool(
  "interleave",
  False,
  "Where dense runs as one call, time it alternately with each selection (--repeats "
  "pairs) and report the median of the per-pair time ratios: robust to the slow drifts "
  "of a shared machine, which move dense's own time by up to 1.7x between runs here.",
)
_GAUSSIAN = flags.DEFINE_bool("gaussian", True, "Also evaluate errors on the Gaussian input.")
_QUICK = flags.DEFINE_bool(
  "quick", False, "Small run: sizes 4096,8192; k 32,64; 3 repeats; no RSS subprocesses."
)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed (inputs, LSH projections, eval rows).")
_OUT = flags.DEFINE_string("out", "bench_selection.json", "Where to write the JSON results.")


def _stats_fn(cfg, k, rng):
  """Jitted top-k attention with stats for one selection config."""
  import jax

  from gsparse.topk import topk_attention

  return jax.jit(
    lambda a, b, c: topk_attention(
      a, b, c, k=k, selection=cfg, selection_key=rng, return_stats=True
    )
  )


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _interleaved(fn, dense_fn, args, repeats):
  """Times `dense_fn` and `fn` alternately; the ratio is the median of per-pair ratios."""
  import jax

  from gsparse import benchmark as bm

  compiled = {
    n: jax.jit(f).lower(*args).compile() for n, f in (("selection", fn), ("dense", dense_fn))
  }
  pairs = bm.interleaved_pairs(compiled["dense"], compiled["selection"], args, repeats)
  res = {
    name: {
      "time_s": pairs[f"{which}_median_s"],
      "times_s": pairs[f"{which}_s"],
      "xla_bytes": bm.xla_bytes(compiled[name]),
    }
    for name, which in (("selection", "second"), ("dense", "first"))
  }
  res["selection"]["out"] = pairs["out"]
  res["ratio"] = pairs["ratio"]
  return res


def main(argv):
  del argv
  import jax

  from gsparse import benchmark as bm
  from gsparse.selection import selection_recall

  sizes = [int(s) for s in _SIZES.value]
  ks = [int(s) for s in _KS.value]
  repeats = _REPEATS.value
  rss_sizes = {int(s) for s in _RSS_SIZES.value}
  if _QUICK.value:
    sizes, ks, repeats, rss_sizes = [4096, 8192], [32, 64], 3, set()
  d = _D.value
  key = jax.random.key(_SEED.value)
  cases = [(n, k) for n in sizes for k in ks]
  if _TARGET.value and (8192, 64) not in cases:
    cases.insert(0, (8192, 64))
  rows_out = []
  dense_cache = {}

  def dense_time(n, q, k, v, reps):
    if n in dense_cache:
      return dense_cache[n]
    # One call's memory, from the compiled program (running it above --max_dense_n
    # would need the n x n logit matrix).
    mem_one = bm.compiled_memory(bm.selection_fn("dense", 1), (q, k, v))
    if n <= _MAX_DENSE.value:
      r = bm.compile_and_time(bm.selection_fn("dense", 1), (q, k, v), reps)
      res = {"time_s": r["time_s"], "mode": "one call", "xla_bytes": mem_one}
    elif n <= _MAX_CHUNKED.value:
      f = lambda a, b, c: bm.chunked_dense(a, b, c, _DENSE_CHUNK.value)
      r = bm.compile_and_time(f, (q, k, v), reps)
      res = {
        "time_s": r["time_s"],
        "mode": f"chunks of {_DENSE_CHUNK.value}",
        "xla_bytes": mem_one,
        "xla_bytes_chunked": r["xla_bytes"],
      }
    else:
      known = [(m, t["time_s"]) for m, t in dense_cache.items() if t["time_s"] is not None]
      est = max(known)[1] * (n / max(known)[0]) ** 2 if known else None
      res = {"time_s": None, "estimate_s": est, "mode": "not run", "xla_bytes": mem_one}
    dense_cache[n] = res
    return res

  for n, k in cases:
    reps = _LONG_REPEATS.value if n >= _LONG_N.value else repeats
    kin, krows = jax.random.split(jax.random.fold_in(key, n * 1000 + k))
    q, kk, v = bm.planted_inputs(kin, n=n, d=d, group=k, noise=_NOISE.value)
    rows = bm.eval_rows(krows, n, _EVAL_ROWS.value)
    dense_rows, topk_rows, ref_stats = bm.exact_reference(q, kk, v, rows, k)
    dres = dense_time(n, q, kk, v, reps)
    dt = dres["time_s"] if dres["time_s"] is not None else dres.get("estimate_s")
    print(f"n={n} k={k}: dense {_fmt(dres['time_s'], '.3f')} s ({dres['mode']})", flush=True)
    for name in _SELECTIONS.value:
      pair = None
      if _INTERLEAVE.value and dres["mode"] == "one call":
        pair = _interleaved(bm.selection_fn(name, k, _SEED.value), bm.selection_fn("dense", 1),
                            (q, kk, v), reps)  # fmt: skip
        r = pair["selection"]
      else:
        r = bm.compile_and_time(bm.selection_fn(name, k, _SEED.value), (q, kk, v), reps)
      out = r.pop("out")
      met = bm.row_metrics(out[rows], dense_rows, topk_rows)
      # Indices for recall: exact/block are row-wise, so run them on the eval rows only;
      # LSH depends on all queries (sorting), so run it on all and keep the rows.
      cfg = bm.SELECTION_CONFIGS[name]
      rng = jax.random.key(_SEED.value)
      if name == "lsh":
        _, st = _stats_fn(cfg, k, rng)(q, kk, v)
        idx = st.indices[rows]
      else:
        _, st = _stats_fn(cfg, k, rng)(q[rows], kk, v)
        idx = st.indices
      recall = float(selection_recall(idx, ref_stats.indices).mean())
      rss = bm.child_rss(name, n, d, k, noise=_NOISE.value) if n in rss_sizes else None
      row = {
        "input": "planted",
        "n": n,
        "k": k,
        "selection": name,
        "repeats": reps,
        "time_s": r["time_s"],
        "times_s": r["times_s"],
        "dense_time_s": dres["time_s"],
        "dense_estimate_s": dres.get("estimate_s"),
        "dense_mode": dres["mode"],
        "ratio": pair["ratio"] if pair else (r["time_s"] / dt if dt else None),
        "interleaved_dense_time_s": pair["dense"]["time_s"] if pair else None,
        "ratio_is_estimate": dres["time_s"] is None,
        "xla_bytes": r["xla_bytes"],
        "dense_xla_bytes": dres["xla_bytes"],
        "rss_bytes": rss,
        "recall": recall,
        **met,
      }
      rows_out.append(row)
      print(
        f"  {name:6s} {r['time_s']:.3f} s  ratio {_fmt(row['ratio'], '.2f')}"
        f"{'(est)' if row['ratio_is_estimate'] else ''}  recall {recall:.3f}  "
        f"err_max {met['err_max']:.2e}  xla {r['xla_bytes'] / 2**20:.0f} MiB"
        + (f"  rss {rss / 2**30:.2f} GiB" if rss else ""),
        flush=True,
      )

  if _GAUSSIAN.value:
    for n, k in cases:
      kin, krows = jax.random.split(jax.random.fold_in(key, n * 1000 + k + 7))
      q, kk, v = bm.gaussian_inputs(kin, n=n, d=d, sigma=_SIGMA.value)
      rows = bm.eval_rows(krows, n, _EVAL_ROWS.value)
      dense_rows, topk_rows, ref_stats = bm.exact_reference(q, kk, v, rows, k)
      lg = (q[rows, 0] @ kk[:, 0].T) / d**0.5
      tau = float(jax.numpy.median(jax.numpy.std(lg, axis=-1)))
      cert = float(ref_stats.error_bound.max())
      topk_err = bm.row_metrics(topk_rows, dense_rows, topk_rows)["err_max"]
      print(
        f"gaussian n={n} k={k}: tau~{tau:.2f}, exact top-k err_max {topk_err:.2e}, "
        f"certificate max {cert:.2e}"
      )
      for name in _SELECTIONS.value:
        cfg = bm.SELECTION_CONFIGS[name]
        rng = jax.random.key(_SEED.value)
        f = _stats_fn(cfg, k, rng)
        if name == "lsh":
          out, st = f(q, kk, v)
          out, idx, eb = out[rows], st.indices[rows], st.error_bound[rows]
        else:
          out, st = f(q[rows], kk, v)
          idx, eb = st.indices, st.error_bound
        met = bm.row_metrics(out, dense_rows, topk_rows)
        err = jax.numpy.linalg.norm(out - dense_rows, axis=-1)
        rows_out.append(
          {
            "input": "gaussian",
            "n": n,
            "k": k,
            "selection": name,
            "sigma": _SIGMA.value,
            "tau_median": tau,
            "recall": float(selection_recall(idx, ref_stats.indices).mean()),
            "exact_topk_certificate_max": cert,
            "own_certificate_max": float(eb.max()),
            "rows_within_exact_certificate": float((err <= ref_stats.error_bound).mean()),
            "rows_within_own_certificate": float((err <= eb * (1 + 1e-4) + 1e-6).mean()),
            **met,
          }
        )
        print(
          f"  {name:6s} err_max {met['err_max']:.2e}  recall {rows_out[-1]['recall']:.3f}  "
          f"within exact cert {rows_out[-1]['rows_within_exact_certificate']:.3f}  "
          f"own cert max {float(eb.max()):.2e}",
          flush=True,
        )

  print()
  print(
    "| input | n | k | selection | time s | dense s | ratio | recall | err max | "
    "XLA MiB (dense) | RSS GiB |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows_out:
    if r["input"] != "planted":
      continue
    dense = (
      f"{r['interleaved_dense_time_s']:.3f} (interleaved)"
      if r["interleaved_dense_time_s"]
      else _fmt(r["dense_time_s"], ".3f")
      if r["dense_time_s"]
      else (f"~{r['dense_estimate_s']:.0f} (est, not run)" if r["dense_estimate_s"] else "not run")
    )
    print(
      f"| planted | {r['n']} | {r['k']} | {r['selection']} | {r['time_s']:.3f} | {dense} | "
      f"{_fmt(r['ratio'], '.2f')}{' (est)' if r['ratio_is_estimate'] else ''} | "
      f"{r['recall']:.3f} | {r['err_max']:.1e} | {r['xla_bytes'] / 2**20:.0f} "
      f"({r['dense_xla_bytes'] / 2**20:.0f}) | "
      f"{_fmt(r['rss_bytes'] / 2**30 if r['rss_bytes'] else None, '.2f')} |"
    )
  print()
  print(
    "| input | n | k | selection | tau | recall | err max | exact top-k cert | "
    "rows within it | own cert max |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows_out:
    if r["input"] != "gaussian":
      continue
    print(
      f"| gaussian | {r['n']} | {r['k']} | {r['selection']} | {r['tau_median']:.2f} | "
      f"{r['recall']:.3f} | {r['err_max']:.1e} | {r['exact_topk_certificate_max']:.1e} | "
      f"{r['rows_within_exact_certificate']:.3f} | {r['own_certificate_max']:.1e} |"
    )
  with open(_OUT.value, "w") as fh:
    json.dump(
      {
        "backend": jax.default_backend(),
        "devices": str(jax.devices()),
        "rows": rows_out,
        "dense": {str(n): v for n, v in dense_cache.items()},
      },
      fh,
      indent=1,
    )
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
