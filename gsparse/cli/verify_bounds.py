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
    informative_settings=sum(r["informative"] for r in rows),
    settings=len(rows),
    seconds=time.time() - t_start,
    backend=jax.default_backend(),
  )
  return dict(summary=summary, rows=rows)


_HEADER = (
  "| d | n | tau | rows | k bound | k emp | k ratio | viol k | "
  "err bound (k=8/32) | err emp | err ratio | viol err | cert viol | logESS emp/pred |"
)


def _fmt_row(r: dict) -> str:
  eb = "/".join(f"{v:.3g}" for v in r["error_bound"])
  ee = "/".join(f"{v:.3g}" for v in r["error_empirical_max"])
  er = "/".join(f"{v:.3g}" for v in r["error_ratio"])
  k_b = f"{r['k_bound']:.0f}" + ("" if r["informative"] else "*")
  return (
    f"| {r['d']} | {r['n']} | {r['tau_target']:g} | {r['rows']} | {k_b} | "
    f"{r['k_empirical_max']} | {r['k_ratio']:.2f} | {r['violations_k']} | {eb} | {ee} | {er} | "
    f"{sum(r['violations_error'])} | {r['cert_violations']} | "
    f"{r['median_log_ess']:.2f}/{r['predicted_log_ess_at_median_tau']:.2f} |"
  )


def _markdown(res: dict) -> str:
  s = res["summary"]
  lines = [
    "# Monte Carlo verification of gsparse.bounds",
    "",
    "Produced by `gsparse-verify-bounds` (gsparse/cli/verify_bounds.py; its docstring "
    "gives the design).",
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
    f"violations beyond float32 rounding: {s['cert_violations']}.",
    f"- Theorem 1 beat the trivial floor(1/eps) in {s['informative_settings']} of "
    f"{s['settings']} settings (`*` marks the others: the bound returned the trivial k).",
    "",
    _HEADER,
    "|" + "---|" * 14,
  ]
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
    ax.axhline(math.floor(1 / rows[0]["eps"]), color="k", lw=0.8, ls=":", label="1/eps")
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
  cmd = " ".join(["gsparse-verify-bounds", *sys.argv[1:]])
  print(_HEADER)
  res = _run(cmd)
  s = res["summary"]
  print(json.dumps(s, indent=1))
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)
  if FLAGS.markdown_out:
    with open(FLAGS.markdown_out, "w") as f:
      f.write(_markdown(res))
  if FLAGS.plot_out:
    _plot(res, FLAGS.plot_out)


def run() -> None:
  """Console entry point `gsparse-verify-bounds`."""
  _define_flags()
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
