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

from gsparse import bounds, gaussian
from gsparse._bounds_mc import matrix_stats
from gsparse.cli import _common
from gsparse.cli import _verify_bounds_render as render
from gsparse.cli._verify_bounds_render import summary_figures  # noqa: F401 (docs name it here)

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


def _grid() -> tuple[list[int], list[int], list[int], list[float], tuple[int, ...]]:
  """The flags' grid: n, matrices per n, d, tau and k."""
  ns = [int(v) for v in FLAGS.n]
  mats = [int(v) for v in FLAGS.matrices]
  if len(mats) != len(ns):
    raise ValueError(f"--matrices needs one entry per n, got {mats} for n={ns}")
  ds = [int(v) for v in FLAGS.d]
  taus = [float(v) for v in FLAGS.tau]
  ks = tuple(int(v) for v in FLAGS.k)
  return ns, mats, ds, taus, ks


def _run(argv_str: str) -> dict:
  ns, mats, ds, taus, ks = _grid()
  eps, delta = FLAGS.eps, FLAGS.delta
  key = jax.random.key(FLAGS.seed)
  rows = []
  t_start = time.time()
  for di, d in enumerate(ds):
    w = gaussian.sample_weights(
      jax.random.fold_in(key, 1000 + di), d=d, head_dim=FLAGS.head_dim, heads=1
    )
    m, w_v = gaussian.interaction_matrix(w.w_q, w.w_k)[0], w.w_v[:, 0, :]
    head = (m, w_v, bounds.interaction_norms(m), bounds.interaction_norms(w_v))
    for ni, (n, r) in enumerate(zip(ns, mats, strict=True)):
      for ti, tau in enumerate(taus):
        setting_key = jax.random.fold_in(key, (di * 100 + ni) * 100 + ti)
        row = _setting(setting_key, head, d=d, n=n, r=r, tau=tau, ks=ks, eps=eps, delta=delta)
        rows.append(row)
        print(render.fmt_row(row), flush=True)
  summary = _summary(rows, argv_str, delta, time.time() - t_start)
  return dict(summary=summary, rows=rows, fixed_tau=_fixed_tau(eps, delta))


def _setting(key, head, *, d, n, r, tau, ks, eps, delta) -> dict:
  """One setting (d, n, tau): `r` Monte Carlo matrices of one head against the bounds.

  `head` is (M, W_V, their `interaction_norms`).
  """
  m, w_v, norms, vnorms = head
  ks_n = tuple(k for k in ks if k < n)
  sigma = math.sqrt(tau / float(norms.frobenius))
  t0 = time.time()
  st = matrix_stats(
    key,
    m,
    w_v,
    jnp.float32(sigma),
    jnp.float32(eps),
    n=n,
    num_matrices=r,
    ks=ks_n,
    batch_size=max(1, min(r, FLAGS.max_batch_elems // (n * n))),
  )
  st = jax.tree.map(np.asarray, st)
  mc_s = time.time() - t0
  sb, eb, vmax_bound, iso = _bounds_at(n, sigma, norms, vnorms, ks_n, eps=eps, delta=delta)
  pred_ess = float(bounds.predicted_effective_support(n, float(np.median(st.median_tau))))
  k_bound = float(sb.k)
  ks_i = range(len(ks_n))
  emp_k = int(st.max_count.max())
  return dict(
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
    violations_k=int(np.sum(st.max_count > k_bound)),
    allowed_violations=r * delta,
    ks=list(ks_n),
    error_bound=[float(v) for v in eb.error],
    tail_bound=[float(v) for v in eb.tail_mass],
    error_empirical_max=[float(v) for v in st.max_error.max(0)],
    tail_empirical_max=[float(v) for v in st.max_tail.max(0)],
    error_ratio=[float(eb.error[i]) / max(float(st.max_error[:, i].max()), 1e-30) for i in ks_i],
    violations_error=[int(np.sum(st.max_error[:, i] > float(eb.error[i]))) for i in ks_i],
    violations_tail=[int(np.sum(st.max_tail[:, i] > float(eb.tail_mass[i]))) for i in ks_i],
    value_norm_bound=vmax_bound,
    **_isotropic_fields(st, iso, ks_i),
    value_norm_empirical_max=float(st.max_value_norm.max()),
    **_certificate_fields(st, n),
    median_log_ess=float(np.median(st.median_log_ess)),
    predicted_log_ess_at_median_tau=math.log(pred_ess),
    seconds=mc_s,
  )


def _bounds_at(n, sigma, norms, vnorms, ks_n, *, eps, delta):
  """Theorems 1, 2 and 2V at each k of `ks_n`, and the value-norm bound (at delta / 4)."""
  sb = bounds.sparsity_bound(n, sigma, norms, eps=eps, delta=delta)
  ks = jnp.asarray(ks_n, jnp.float32)
  eb = bounds.topk_error_bound(n, sigma, norms, k=ks, value_norms=vnorms, delta=delta)
  iso = bounds.isotropic_error_bound(n, sigma, norms, value_norms=vnorms, k=ks, delta=delta)
  return sb, eb, float(bounds.value_norm_bound(n, sigma, vnorms, delta=delta / 4)), iso


def _isotropic_fields(st, iso, ks_i) -> dict:
  """Theorem 2V (docs/theory.md 4.2) per k: the bound, its ratio, violations, its split."""
  obs = [max(float(st.max_error[:, i].max()), 1e-30) for i in ks_i]
  return dict(
    error_bound_2v=[float(iso.error[i]) for i in ks_i],
    error_ratio_2v=[float(iso.error[i]) / obs[i] for i in ks_i],
    violations_error_2v=[int(np.sum(st.max_error[:, i] > float(iso.error[i]))) for i in ks_i],
    split_2v=[
      [float(iso.diag_part[i]), float(iso.mean_part[i]), float(iso.gauss_part[i])] for i in ks_i
    ],
  )


def _certificate_fields(st, n: int) -> dict:
  """The deterministic certificates' excess and slack; float32 rounding is allowed only."""
  tol_t = 1e-4  # relative
  tol_e = 4.0 * math.sqrt(n) * _F32 * float(st.max_value_norm.max())
  multi_viol = int(np.sum(st.multi_tail_excess > tol_t))
  multi_viol += int(np.sum(st.band_tail_excess > tol_t))
  return dict(
    cert_tail_max_excess=float(st.cert_tail_excess.max()),
    cert_error_max_excess=float(st.cert_error_excess.max()),
    cert_error_tolerance=tol_e,
    cert_violations=int(np.sum(st.cert_tail_excess > tol_t))
    + int(np.sum(st.cert_error_excess > tol_e)),
    cert_tail_max_slack=float(st.cert_tail_slack.max()),
    multi_violations=multi_viol,
    multi_tail_max_slack=float(st.multi_tail_slack.max()),
    band_tail_max_slack=float(st.band_tail_slack.max()),
  )


def _summary(rows: list[dict], argv_str: str, delta: float, seconds: float) -> dict:
  """Totals over the settings."""
  total_mats = sum(r["matrices"] for r in rows)
  return dict(
    command=argv_str,
    total_rows=sum(r["rows"] for r in rows),
    total_matrices=total_mats,
    expected_violations_allowed=total_mats * delta,
    violations_k=sum(r["violations_k"] for r in rows),
    violations_error=sum(sum(r["violations_error"]) for r in rows),
    violations_tail=sum(sum(r["violations_tail"]) for r in rows),
    violations_error_2v=sum(sum(r.get("violations_error_2v", [0])) for r in rows),
    cert_violations=sum(r["cert_violations"] for r in rows),
    multi_violations=sum(r.get("multi_violations", 0) for r in rows),
    informative_settings=sum(r["informative"] for r in rows),
    settings=len(rows),
    seconds=seconds,
    backend=jax.default_backend(),
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
    print(render.HEADER)
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
      f.write(render.markdown(res, before))
  if FLAGS.plot_out:
    render.plot(res, FLAGS.plot_out)


def run() -> None:
  """Console entry point `gsparse-verify-bounds`."""
  _define_flags()
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
