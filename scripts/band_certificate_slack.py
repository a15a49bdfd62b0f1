"""Slack of `TopKStats.tail_mass_bound` (certificate / float64 tail) by phase, and its cost.

Rows: unit-norm queries against Gaussian keys with `scale = tau`, so the
logits of a row are `tau * g_j`, `g_j ~ N(0, 1)` i.i.d. given the query;
`tau` above `sqrt(2 ln S)` is the collapsed phase. For each `tau` and `k`
the script prints the median and maximum over rows of the stats' bound over
the float64 dense tail, and the same for the single-gap certificate of the
same selection (`selection_tail_bound` of a selection without band counts,
the certificate before band counts). Then the time of `topk_attention` on
the default route with and without `return_stats`.

  PYTHONPATH=. python scripts/band_certificate_slack.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import gsparse


def _tails(q, key, tau, k):
  lg = np.einsum("tnh,snh->nts", np.float64(q), np.float64(key)) * tau
  srt = -np.sort(-lg, axis=-1)

  def lse(a):
    top = a.max(-1, keepdims=True)
    return top[..., 0] + np.log(np.exp(a - top).sum(-1))

  return (1.0 / (1.0 + np.exp(lse(srt[..., :k]) - lse(srt[..., k:])))).T


def slack_table(t, s, n, h, taus, ks, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (t, n, h))
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  key = jax.random.normal(keys[1], (s, n, h))
  v = jax.random.normal(keys[2], (s, n, 8))
  print(f"S={s}, rows={t * n}, sqrt(2 ln S)={np.sqrt(2 * np.log(s)):.2f}")
  print("| tau | k | median tail | stats slack median / max | single-gap slack median / max |")
  print("|---|---|---|---|---|")
  for tau in taus:
    for k in ks:
      _, st = gsparse.topk_attention(q, key, v, k=k, scale=tau, return_stats=True)
      sel = gsparse.topk.select_keys(q, key, v, k=k, scale=tau)
      single = gsparse.topk.selection_tail_bound(sel, st.logsumexp)
      tail = _tails(q, key, tau, k)
      a = np.asarray(st.tail_mass_bound, np.float64) / tail
      b = np.asarray(single, np.float64) / tail
      print(
        f"| {tau:g} | {k} | {np.median(tail):.2e} | {np.median(a):.3f} / {a.max():.3f} "
        f"| {np.median(b):.3g} / {b.max():.3g} |"
      )


def timing(t, s, n, h, k, reps=5):
  keys = jax.random.split(jax.random.key(1), 3)
  q, key, v = (jax.random.normal(kk, (x, n, h)) for kk, x in zip(keys, (t, s, s), strict=True))
  print(f"\nTime of topk_attention (default route), T=S={s}, N={n}, H={h}, k={k}, best of {reps}:")
  for stats in (False, True):
    f = jax.jit(
      lambda q, key, v, stats=stats: gsparse.topk_attention(q, key, v, k=k, return_stats=stats)
    )
    jax.block_until_ready(f(q, key, v))
    wall, cpu = np.inf, np.inf
    for _ in range(reps):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(f(q, key, v))
      wall = min(wall, time.perf_counter() - t0)
      cpu = min(cpu, time.process_time() - c0)
    print(f"  return_stats={stats}: wall {wall * 1e3:.1f} ms, process CPU {cpu * 1e3:.1f} ms")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")
  if args.quick:
    slack_table(16, 256, 2, 16, (2.0, 16.0), (8,))
    timing(256, 256, 2, 64, 16, reps=2)
    return
  slack_table(64, 1024, 4, 32, (1.0, 2.0, 4.0, 8.0, 16.0, 24.0), (8, 32))
  timing(2048, 2048, 4, 64, 64)


if __name__ == "__main__":
  main()
