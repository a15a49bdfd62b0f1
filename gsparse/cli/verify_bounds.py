"""Monte Carlo check of the bounds of gsparse.bounds (Theorems 1 and 2 and the certificate).

Usage:
  gsparse-verify-bounds --out=/tmp/verify_bounds.json \
      --markdown_out=docs/bounds_verification.md --plot_out=docs/bounds_vs_tau.png

(or `python -m gsparse.cli.verify_bounds`; `--plot_out` needs matplotlib,
`pip install 'gsparse-jax[report]'`).

Unit of failure. Theorems 1 and 2 are statements about a whole attention
matrix: "with probability >= 1 - delta, EVERY row is (eps, k)-sparse" (resp.
has top-k error <= the bound). So one Monte Carlo trial is one matrix (n rows
drawn together), and a trial fails if ANY of its rows breaks the bound. With
R trials at failure probability delta, the expected number of failures is at
most R * delta; we report the count and that allowance. With the default grid
R * delta is far below 1, so any failure at all would be evidence of a bug.
The certificate (fact 4) is deterministic and is checked on every row.

Sample sizes (defaults): for each n in {256, 1024, 4096, 8192} the number of
matrices per setting is {128, 32, 4, 2}, i.e. {32768, 32768, 16384, 16384}
rows; 3 values of d x 5 scales = 15 settings per n, so 1.47 million rows and
2490 matrices in total.

Tightness. "k ratio" = bound k / (largest minimal k seen over the R matrices
of the setting), the empirical (1 - 1/R) quantile of the matrix-level minimal
k (the (1 - delta) quantile itself needs >> 1/delta matrices). "err ratio" =
error bound / largest observed top-k error.

Weights: one head per setting, W_Q, W_K, W_V with i.i.d. N(0, 1/d) entries
(h = h_v = 64, scale 1/sqrt(h)); sigma is then chosen so that
sqrt(E tau^2) = sigma^2 ||M||_F equals the requested `tau` (diffuse at 0.5,
collapsed at 8 since sqrt(2 ln 8192) = 4.2).
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import gsparse
from gsparse import bounds
from gsparse._bounds_mc import matrix_stats
from gsparse.cli import _common

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the flags (in `run()`, so that importing this module defines none)."""
  flags.DEFINE_list("n", ["256", "1024", "4096", "8192"], "Sequence lengths n.")
  flags.DEFINE_list(
    "matrices",
    ["128", "32", "4", "2"],
    "Independent matrices (trials) per setting, one entry per n (same order).",
  )
  flags.DEFINE_list("d", ["16", "64", "128"], "Input dimensions d.")
  flags.DEFINE_list(
    "tau",
    ["0.5", "1", "2", "4", "8"],
    "Target sqrt(E tau^2) = sigma^2 ||M||_F per setting (sigma is derived from it).",
  )
  flags.DEFINE_integer("head_dim", 64, "h = h_v, the query/key/value head dimension.")
  flags.DEFINE_float("eps", 0.01, "Threshold of (eps, k)-sparsity for Theorem 1.")
  flags.DEFINE_list("k", ["8", "32"], "Top-k sizes checked by Theorem 2 and the certificate.")
  flags.DEFINE_float("delta", 1e-4, "Failure probability of Theorems 1 and 2.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.DEFINE_integer(
    "max_batch_elems", 2**24, "Matrices per batch are chosen so batch * n^2 stays below this."
  )
  flags.DEFINE_string("out", "/tmp/verify_bounds.json", "Where to write the JSON results.")
  flags.DEFINE_string("markdown_out", "", "If set, also write the table as Markdown here.")
  flags.DEFINE_string("plot_out", "", "If set, write a PNG of bound vs empirical k here.")
  flags.DEFINE_string(
    "render_from", "", "If set, run nothing: render --markdown_out/--plot_out from this JSON."
  )
  flags.DEFINE_list(
    "fixed_taus", ["1", "2", "4", "8"], "Row scales of the fixed-tau check of Theorems 1 and 1R."
  )
  flags.DEFINE_integer("fixed_n", 256, "n of the fixed-tau check.")
  flags.DEFINE_integer("fixed_rows", 40960, "Rows per tau of the fixed-tau check.")
  flags.DEFINE_string(
    "before", "", "If set, a JSON of an earlier run: the Markdown gets a before/after table."
  )


# Float32 rounding allowance for the deterministic certificate: the tail mass may
# exceed its certificate by 1e-4 relative; the error may exceed its certificate by
# 4 sqrt(n) eps_f32 max_j ||v_j|| (rounding of the dense output p @ V over n terms).
_F32 = float(np.finfo(np.float32).eps)


def _run(argv_str: str) -> dict:
  ns = [int(v) for v in FLAGS.n]
  mats = [int(v) for v in FLAGS.matrices]
  if len(mats) != len(ns):
    raise ValueError(f"--matrices needs one entry per n, got {mats} for n={ns}")
  ds = [int(v) for v in FLAGS.d]
  taus = [float(v) for v in FLAGS.tau]
  ks = tuple(int(v) for v in FLAGS.k)
  eps, delta = FLAGS.eps, FLAGS.delta
  key = jax.random.key(FLAGS.seed)
  rows = []
  t_start = time.time()
  for di, d in enumerate(ds):
    w = gsparse.sample_weights(
      jax.random.fold_in(key, 1000 + di), d=d, head_dim=FLAGS.head_dim, heads=1
    )
    m = gsparse.interaction_matrix(w.w_q, w.w_k)[0]
    w_v = w.w_v[:, 0, :]
    norms = bounds.interaction_norms(m)
    vnorms = bounds.interaction_norms(w_v)
    for ni, (n, r) in enumerate(zip(ns, mats, strict=True)):
      ks_n = tuple(k for k in ks if k < n)
      for ti, tau in enumerate(taus):
        sigma = math.sqrt(tau / float(norms.frobenius))
        t0 = time.time()
        batch = max(1, min(r, FLAGS.max_batch_elems // (n * n)))
        st = matrix_stats(
          jax.random.fold_in(key, (di * 100 + ni) * 100 + ti),
          m,
          w_v,
          jnp.float32(sigma),
          jnp.float32(eps),
          n=n,
          num_matrices=r,
          ks=ks_n,
          batch_size=batch,
        )
        st = jax.tree.map(np.asarray, st)
        mc_s = time.time() - t0
        sb = bounds.sparsity_bound(n, sigma, norms, eps=eps, delta=delta)
        eb = bounds.topk_error_bound(
          n, sigma, norms, k=jnp.asarray(ks_n, jnp.float32), value_norms=vnorms, delta=delta
        )
        vmax_bound = float(bounds.value_norm_bound(n, sigma, vnorms, delta=delta / 4))
        k_bound = float(sb.k)
        emp_k = int(st.max_count.max())
        viol_k = int(np.sum(st.max_count > k_bound))
        viol_e = [int(np.sum(st.max_error[:, i] > float(eb.error[i]))) for i in range(len(ks_n))]
        viol_t = [int(np.sum(st.max_tail[:, i] > float(eb.tail_mass[i]))) for i in range(len(ks_n))]
        # Certificate: deterministic; allow float32 rounding only.
        tol_t = 1e-4  # relative
        tol_e = 4.0 * math.sqrt(n) * _F32 * float(st.max_value_norm.max())
        cert_t_viol = int(np.sum(st.cert_tail_excess > tol_t))
        cert_e_viol = int(np.sum(st.cert_error_excess > tol_e))
        multi_viol = int(np.sum(st.multi_tail_excess > tol_t))
        multi_viol += int(np.sum(st.band_tail_excess > tol_t))
        pred_ess = float(bounds.predicted_effective_support(n, float(np.median(st.median_tau))))
        row = dict(
          d=d,
          n=n,
          tau_target=tau,
          sigma=sigma,
          matrices=r,
          rows=r * n,
          tau_row_min=float(st.min_tau.min()),
          tau_row_max=float(st.max_tau.max()),
          tau_lo_bound=float(sb.tau_lo),
          tau_hi_bound=float(sb.tau_hi),
          eps=eps,
          delta=delta,
          k_bound=k_bound,
          k_trivial=float(sb.trivial_k),
          informative=bool(sb.informative),
          k_empirical_max=emp_k,
          k_ratio=k_bound / max(emp_k, 1),
          violations_k=viol_k,
          allowed_violations=r * delta,
          ks=list(ks_n),
          error_bound=[float(v) for v in eb.error],
          tail_bound=[float(v) for v in eb.tail_mass],
          error_empirical_max=[float(v) for v in st.max_error.max(0)],
          tail_empirical_max=[float(v) for v in st.max_tail.max(0)],
          error_ratio=[
            float(eb.error[i]) / max(float(st.max_error[:, i].max()), 1e-30)
            for i in range(len(ks_n))
          ],
          violations_error=viol_e,
          violations_tail=viol_t,
          value_norm_bound=vmax_bound,
          value_norm_empirical_max=float(st.max_value_norm.max()),
          cert_tail_max_excess=float(st.cert_tail_excess.max()),
          cert_error_max_excess=float(st.cert_error_excess.max()),
          cert_error_tolerance=tol_e,
          cert_violations=cert_t_viol + cert_e_viol,
          cert_tail_max_slack=float(st.cert_tail_slack.max()),
          multi_violations=multi_viol,
          multi_tail_max_slack=float(st.multi_tail_slack.max()),
          band_tail_max_slack=float(st.band_tail_slack.max()),
          median_log_ess=float(np.median(st.median_log_ess)),
          predicted_log_ess_at_median_tau=math.log(pred_ess),
          seconds=mc_s,
        )
        rows.append(row)
        print(_fmt_row(row), flush=True)
  total_rows = sum(r["rows"] for r in rows)
  total_mats = sum(r["matrices"] for r in rows)
  summary = dict(
    command=argv_str,
    total_rows=total_rows,
    total_matrices=total_mats,
    expected_violations_allowed=total_mats * delta,
    violations_k=sum(r["violations_k"] for r in rows),
    violations_error=sum(sum(r["violations_error"]) for r in rows),
    violations_tail=sum(sum(r["violations_tail"]) for r in rows),
    cert_violations=sum(r["cert_violations"] for r in rows),
    multi_violations=sum(r.get("multi_violations", 0) for r in rows),
    informative_settings=sum(r["informative"] for r in rows),
    settings=len(rows),
    seconds=time.time() - t_start,
    backend=jax.default_backend(),
  )
  return dict(summary=summary, rows=rows, fixed_tau=_fixed_tau(eps, delta))


_HEADER = (
  "| d | n | tau | rows | k bound | k emp | k ratio | viol k | "
  "err bound (k=8/32) | err emp | err ratio | tail bound / 1-k/n | slack single/multi/band | "
  "viol err | cert viol | logESS emp/pred |"
)


def _fmt_row(r: dict) -> str:
  eb = "/".join(f"{v:.3g}" for v in r["error_bound"])
  ee = "/".join(f"{v:.3g}" for v in r["error_empirical_max"])
  er = "/".join(f"{v:.3g}" for v in r["error_ratio"])
  k_b = f"{r['k_bound']:.0f}" + ("" if r["informative"] else "*")
  tb = "/".join(
    f"{b:.3g}/{1 - k / r['n']:.3g}" for b, k in zip(r["tail_bound"], r["ks"], strict=True)
  )
  extra = [r.get(f) for f in ("multi_tail_max_slack", "band_tail_max_slack")]
  sl = "/".join(
    [f"{r['cert_tail_max_slack']:.3g}"] + ["-" if v is None else f"{v:.3g}" for v in extra]
  )
  return (
    f"| {r['d']} | {r['n']} | {r['tau_target']:g} | {r['rows']} | {k_b} | "
    f"{r['k_empirical_max']} | {r['k_ratio']:.2f} | {r['violations_k']} | {eb} | {ee} | {er} | "
    f"{tb} | {sl} | "
    f"{sum(r['violations_error'])} | {r['cert_violations']} | "
    f"{r['median_log_ess']:.2f}/{r['predicted_log_ess_at_median_tau']:.2f} |"
  )


def _fixed_tau(eps: float, delta: float) -> list[dict]:
  """Theorem 1's core and Theorem 1R at a known row scale, against Monte Carlo rows.

  Rows of `n - 1` i.i.d. `N(0, tau^2)` scores (the off-diagonal part of a row
  given `tau_i`; the diagonal counted as one entry), per-row failure level
  `delta / (2 n)` as in Theorem 1.
  """
  from gsparse.bounds.sparsity import _sparsity_core

  n, rows = FLAGS.fixed_n, FLAGS.fixed_rows
  taus = np.asarray([float(t) for t in FLAGS.fixed_taus], np.float32)
  drow = delta / (2 * n)
  from gsparse.bounds.error import _tail_core

  k_row = np.asarray(bounds.row_sparsity_bound(n, taus, eps=eps, delta=drow))
  kt = [int(v) for v in FLAGS.k if int(v) < n]
  t_row = np.asarray(
    bounds.row_tail_bound(n, np.repeat(taus, len(kt)), k=np.tile(kt, len(taus)), delta=drow)
  ).reshape(len(taus), len(kt))
  core = jax.jit(_sparsity_core)
  tcore = jax.jit(_tail_core)
  out = []
  for i, tau in enumerate(taus):
    t32 = jnp.float32(tau)
    k_old = float(core(jnp.float32(n), t32, t32, jnp.float32(eps), jnp.log(jnp.float32(drow)))[0])
    s = tau * jax.random.normal(jax.random.key(1000 + i), (rows, n - 1))
    worst = int(jnp.max(jnp.sum(jax.nn.softmax(s, axis=-1) > eps, axis=-1))) + 1
    lse = jax.nn.logsumexp(s, axis=-1)
    tails, olds = [], []
    for k in kt:
      head = jax.nn.logsumexp(jax.lax.top_k(s, k)[0], axis=-1)
      tails.append(float(jnp.max(1.0 - jnp.exp(head - lse))))
      log_drow = jnp.log(jnp.float32(drow))
      olds.append(float(jnp.exp(tcore(jnp.float32(n), t32, t32, jnp.float32(k), log_drow))))
    out.append(
      dict(
        n=n,
        tau=float(tau),
        rows=rows,
        delta_row=drow,
        k_theorem1_core=k_old,
        k_theorem1r=float(k_row[i]),
        k_worst_observed=worst,
        ks=kt,
        tail_theorem2_core=olds,
        tail_theorem2r=[float(v) for v in t_row[i]],
        tail_worst_observed=tails,
      )
    )
  return out


def _quantiles(v) -> str:
  v = np.asarray(v, np.float64)
  if v.size == 0:
    return "n/a"
  return f"{v.min():.3g} / {np.median(v):.3g} / {v.max():.3g}"


def summary_figures(res: dict) -> dict:
  """The figures that docs quote, computed from a run's JSON (one place, never typed by hand)."""
  rows = res["rows"]
  big = [r for r in rows if r["tau_target"] >= 1]
  kr = [r["k_ratio"] for r in big]
  er = [v for r in rows for v in r["error_ratio"]]
  pairs = [(r, i) for r in rows for i in range(len(r["ks"]))]
  tail_vs_trivial = [r["tail_bound"][i] >= 1 - r["ks"][i] / r["n"] for r, i in pairs]
  collapsed = [r for r in rows if r["tau_target"] >= math.sqrt(2 * math.log(r["n"]))]
  out = {
    "settings": len(rows),
    "k_ratio_tau_ge_1 (min/median/max)": _quantiles(kr),
    "k_ratio_tau_ge_1 within 2x": f"{sum(v <= 2 for v in kr)} of {len(kr)}",
    "k_ratio_tau_ge_1 within 3x": f"{sum(v <= 3 for v in kr)} of {len(kr)}",
    "k_ratio all (min/median/max)": _quantiles([r["k_ratio"] for r in rows]),
    "k bound / trivial k (min/median/max)": _quantiles(
      [r["k_bound"] / r["k_trivial"] for r in rows]
    ),
    "tail bound (min/median/max)": _quantiles([r["tail_bound"][i] for r, i in pairs]),
    "tail bound >= trivial 1 - k/n": f"{sum(tail_vs_trivial)} of {len(pairs)} (setting, k) pairs",
    "error ratio (min/median/max)": _quantiles(er),
    "value factor 2 V / observed max ||v|| (min/median/max)": _quantiles(
      [2 * r["value_norm_bound"] / r["value_norm_empirical_max"] for r in rows]
    ),
    "tau_lo bound / target tau (min/median/max)": _quantiles(
      [r["tau_lo_bound"] / r["tau_target"] for r in rows]
    ),
    "tau_hi bound / target tau (min/median/max)": _quantiles(
      [r["tau_hi_bound"] / r["tau_target"] for r in rows]
    ),
    "observed row tau / target tau (min..max)": (
      f"{min(r['tau_row_min'] / r['tau_target'] for r in rows):.3g}.."
      f"{max(r['tau_row_max'] / r['tau_target'] for r in rows):.3g}"
    ),
    "single-gap certificate slack, max per setting (min/median/max)": _quantiles(
      [r["cert_tail_max_slack"] for r in rows]
    ),
  }
  if collapsed:
    out["single-gap slack, collapsed settings (min/median/max)"] = _quantiles(
      [r["cert_tail_max_slack"] for r in collapsed]
    )
  if all("multi_tail_max_slack" in r for r in rows):
    out["multi-gap certificate slack, max per setting (min/median/max)"] = _quantiles(
      [r["multi_tail_max_slack"] for r in rows]
    )
    if collapsed:
      out["multi-gap slack, collapsed settings (min/median/max)"] = _quantiles(
        [r["multi_tail_max_slack"] for r in collapsed]
      )
  if all("band_tail_max_slack" in r for r in rows):
    out["band-count certificate slack, max per setting (min/median/max)"] = _quantiles(
      [r["band_tail_max_slack"] for r in rows]
    )
    if collapsed:
      out["band-count slack, collapsed settings (min/median/max)"] = _quantiles(
        [r["band_tail_max_slack"] for r in collapsed]
      )
  s = res["summary"]
  out["violations (Thm 1 / Thm 2 error / Thm 2 tail / certificates)"] = (
    f"{s['violations_k']} / {s['violations_error']} / {s['violations_tail']} / "
    f"{s['cert_violations'] + s.get('multi_violations', 0)}"
  )
  return out


def _markdown(res: dict, before: dict | None = None) -> str:
  s = res["summary"]
  fig = summary_figures(res)
  lines = [
    "# Monte Carlo verification of gsparse.bounds",
    "",
    "Produced by `gsparse-verify-bounds` (gsparse/cli/verify_bounds.py; its docstring "
    "gives the design); every number",
    "below is rendered from the run's JSON by `summary_figures`, none is typed by hand.",
    "",
    f"Command: `{s['command']}`",
    "",
    f"- {s['total_rows']} attention rows in {s['total_matrices']} matrices "
    f"({s['settings']} settings), backend {s['backend']}, {s['seconds']:.0f} s.",
    f"- eps = {res['rows'][0]['eps']}, delta = {res['rows'][0]['delta']}; unit of failure = "
    "one matrix (all its rows); expected failures allowed by delta over all matrices: "
    f"{s['expected_violations_allowed']:.3f}.",
    f"- Theorem 1 violations: {s['violations_k']}; Theorem 2 error violations: "
    f"{s['violations_error']} (tail-mass: {s['violations_tail']}); certificate "
    f"violations beyond float32 rounding: {s['cert_violations']} (multi-gap: "
    f"{s.get('multi_violations', 'not run')}).",
    f"- Theorem 1 beat the trivial ceil(1/eps) - 1 in {s['informative_settings']} of "
    f"{s['settings']} settings (`*` marks the others: the bound returned the trivial k).",
    "- k ratio = Theorem-1 k / worst observed minimal k; err ratio = Theorem-2 error / worst",
    "  observed error; slack = certificate / true tail, the worst row; collapsed settings are",
    "  those with tau >= sqrt(2 ln n).",
    "",
    "## Summary",
    "",
    "| figure | " + ("before | after |" if before else "value |"),
    "|---|---|" + ("---|" if before else ""),
  ]
  old = summary_figures(before) if before else {}
  for name, v in fig.items():
    lines.append(f"| {name} | " + (f"{old.get(name, 'n/a')} | {v} |" if before else f"{v} |"))
  if before:
    lines += ["", f"Before: `{before['summary']['command']}` (an earlier commit)."]
  if res.get("fixed_tau"):
    ft = res["fixed_tau"]
    lines += [
      "",
      f"## Known row scale (n = {ft[0]['n']}, per-row level delta / (2n) = "
      f"{ft[0]['delta_row']:.3g}, {ft[0]['rows']} Monte Carlo rows per tau)",
      "",
      "| tau | Theorem 1 core at [tau, tau] | Theorem 1R | worst observed | 1R / observed |",
      "|---|---|---|---|---|",
    ]
    lines += [
      f"| {r['tau']:g} | {r['k_theorem1_core']:.0f} | {r['k_theorem1r']:.0f} | "
      f"{r['k_worst_observed']} | {r['k_theorem1r'] / r['k_worst_observed']:.2f} |"
      for r in ft
    ]
    if "tail_theorem2r" in ft[0]:
      lines += [
        "",
        "| tau | k | Theorem 2 core tail at [tau, tau] | Theorem 2R tail | worst observed "
        "| 1 - k/n |",
        "|---|---|---|---|---|---|",
      ]
      lines += [
        f"| {r['tau']:g} | {k} | {a:.3g} | {b:.3g} | {c:.3g} | {1 - k / r['n']:.3g} |"
        for r in ft
        for k, a, b, c in zip(
          r["ks"],
          r["tail_theorem2_core"],
          r["tail_theorem2r"],
          r["tail_worst_observed"],
          strict=True,
        )
      ]
  lines += ["", "## Per setting", "", _HEADER, "|" + "---|" * (_HEADER.count("|") - 1)]
  lines += [_fmt_row(r) for r in res["rows"]]
  return "\n".join(lines) + "\n"


def _plot(res: dict, path: str) -> None:
  import matplotlib.pyplot as plt  # the Agg backend was selected by main()

  rows = res["rows"]
  ds = sorted({r["d"] for r in rows})
  fig, axes = plt.subplots(1, len(ds), figsize=(4.5 * len(ds), 3.6), squeeze=False)
  for ax, d in zip(axes[0], ds, strict=True):
    for n in sorted({r["n"] for r in rows}):
      sel = sorted((r for r in rows if r["d"] == d and r["n"] == n), key=lambda r: r["tau_target"])
      x = [r["tau_target"] for r in sel]
      (line,) = ax.plot(x, [r["k_bound"] for r in sel], "-o", label=f"bound n={n}")
      ax.plot(x, [r["k_empirical_max"] for r in sel], "--x", color=line.get_color(), label="emp.")
    triv = math.ceil(1 / rows[0]["eps"]) - 1
    ax.axhline(triv, color="k", lw=0.8, ls=":", label="ceil(1/eps) - 1")
    ax.set_xscale("log")
    ax.set_xlabel("sqrt(E tau^2)")
    ax.set_ylabel(f"k at eps={rows[0]['eps']}")
    ax.set_title(f"d={d}")
  axes[0][0].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  import sys

  if FLAGS.plot_out:
    _common.use_agg_matplotlib("--plot_out")

  if FLAGS.render_from:
    with open(FLAGS.render_from) as f:
      res = json.load(f)
    if "fixed_tau" not in res or "tail_theorem2r" not in res["fixed_tau"][0]:
      res["fixed_tau"] = _fixed_tau(res["rows"][0]["eps"], res["rows"][0]["delta"])
      with open(FLAGS.out, "w") as f:
        json.dump(res, f, indent=1)
  else:
    cmd = " ".join(["gsparse-verify-bounds", *sys.argv[1:]])
    print(_HEADER)
    res = _run(cmd)
    print(json.dumps(res["summary"], indent=1))
    with open(FLAGS.out, "w") as f:
      json.dump(res, f, indent=1)
  before = None
  if FLAGS.before:
    with open(FLAGS.before) as f:
      before = json.load(f)
  if FLAGS.markdown_out:
    with open(FLAGS.markdown_out, "w") as f:
      f.write(_markdown(res, before))
  if FLAGS.plot_out:
    _plot(res, FLAGS.plot_out)


def run() -> None:
  """Console entry point `gsparse-verify-bounds`."""
  _define_flags()
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
