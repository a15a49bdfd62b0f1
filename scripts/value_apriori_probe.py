"""Where Theorem 2V's factor sits: the worst observed row's Lemma V pieces against the bound's.

For a few settings of scripts/verify_bounds.py (same weights recipe: one head,
W_Q, W_K, W_V with N(0, 1/d) entries, h = h_v = 64, sigma from the target tau),
draws R matrices, takes the row with the largest top-k error, and prints its
tail mass t, mean gap |m| / t (the along-u coordinate, Lemma V), sqrt(q), head
share of the largest key and |omega_i| next to Theorem 2V's bound and its
pieces (docs/theory.md 4.2). Usage: PYTHONPATH=. python scripts/value_apriori_probe.py
"""

from __future__ import annotations

import math

import jax
import numpy as np

from gsparse import bounds, gaussian
from gsparse.bounds.value_apriori import _order_stats


def _worst_row(rng, m, w_v, sigma, n, k, reps):
  best = None
  d = m.shape[0]
  for _ in range(reps):
    x = sigma * rng.standard_normal((n, d))
    v, s = x @ w_v, x @ m @ x.T
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    head = np.zeros_like(p, bool)
    np.put_along_axis(head, np.argsort(-s, 1)[:, :k], True, 1)
    h = (p * head).sum(1)
    err = np.linalg.norm(p @ v - ((p * head) @ v) / h[:, None], axis=1)
    i = int(np.argmax(err))
    if best is not None and err[i] <= best[0]:
      continue
    t = 1.0 - h[i]
    om = np.where(head[i], -t * p[i] / h[i], p[i])
    u = m.T @ x[i] / np.linalg.norm(m.T @ x[i])
    g = x @ u / sigma
    off = np.arange(n) != i
    r = p[i][head[i] & off] / p[i][head[i] & off].sum()
    best = (err[i], t, abs(om[off] @ g[off]) / t, math.sqrt(om[off] @ om[off]), r.max(), abs(om[i]))
  return best


def main():
  rng = np.random.default_rng(0)
  delta = 1e-4
  print(
    "| d | n | tau | k | worst err | t | abs(m)/t | sqrt(q) | top head share | abs(omega_i) |"
    " 2V bound | 2V / err | Thm 2 / err | diag/mean/gauss | g1_hi - et_lo |"
  )
  print("|---" * 15 + "|")
  for d in (16, 64):
    w = gaussian.sample_weights(jax.random.key(d), d=d, head_dim=64, heads=1)
    m = np.asarray(gaussian.interaction_matrix(w.w_q, w.w_k)[0], np.float64)
    w_v = np.asarray(w.w_v[:, 0, :], np.float64)
    nm, vn = bounds.interaction_norms(m), bounds.interaction_norms(w_v)
    for n in (256, 1024):
      for tau in (0.5, 2.0, 8.0):
        sigma = math.sqrt(tau / float(nm.frobenius))
        for k in (8, 32):
          e, t, gap, sq, share, om_i = _worst_row(rng, m, w_v, sigma, n, k, 16 if n == 256 else 4)
          b = bounds.isotropic_error_bound(n, sigma, nm, value_norms=vn, k=k, delta=delta)
          old = float(bounds.topk_error_bound(n, sigma, nm, k=k, value_norms=vn, delta=delta).error)
          dr = delta / (2 * n) / 8
          g1, _, _, et_lo, _ = _order_stats(np.float64(n), np.float64(k), dr, dr, dr / 2)
          split = "/".join(f"{float(x):.3g}" for x in (b.diag_part, b.mean_part, b.gauss_part))
          print(
            f"| {d} | {n} | {tau:g} | {k} | {e:.3g} | {t:.3f} | {gap:.2f} | {sq:.3f} | {share:.2f} "
            f"| {om_i:.3f} | {float(b.error):.3g} | {float(b.error) / e:.2f} | {old / e:.2f} "
            f"| {split} | {float(g1 - et_lo):.2f} |"
          )


if __name__ == "__main__":
  main()
