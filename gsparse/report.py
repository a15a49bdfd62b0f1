"""The default report: how sparse is attention on Gaussian input?

Library code for `scripts/report.py`. It draws the paper's setting at a few
(n, d, sigma), measures the empirical (eps, k)-sparsity of every attention row
and the error of top-k attention, and returns the rows of a table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gsparse.attention import attention_weights
from gsparse.gaussian import project, sample_inputs, sample_weights
from gsparse.sparsity import min_sparse_k, topk_error_decomposition
from gsparse.topk import topk_attention


@dataclasses.dataclass(frozen=True)
class SparsityRow:
  """One line of the sparsity table (means over all rows and trials)."""

  n: int
  d: int
  sigma: float
  eps: float
  trivial_k: int
  mean_min_k: float
  max_min_k: int
  k: int
  mean_tail_mass: float
  mean_error: float
  max_error: float
  max_certified_error: float


@functools.partial(jax.jit, static_argnames=("n", "d", "eps", "k", "trials"))
def _measure(key, sigma, *, n, d, eps, k, trials):
  def one(key):
    kx, kw = jax.random.split(key)
    x = sample_inputs(kx, n=n, d=d, sigma=sigma)
    w = sample_weights(kw, d=d, head_dim=d)
    q, kk, v = project(x, w)
    p = attention_weights(q, kk)[0]  # [n, n], one head
    mk = min_sparse_k(p, eps=eps)
    dec = topk_error_decomposition(p, v[:, 0, :], k=k)
    _, stats = topk_attention(q, kk, v, k=k, return_stats=True)
    return mk, dec.tail_mass, dec.error, stats.error_bound[:, 0]

  mk, t, err, cert = jax.vmap(one)(jax.random.split(key, trials))
  return (jnp.mean(mk), jnp.max(mk), jnp.mean(t), jnp.mean(err), jnp.max(err), jnp.max(cert))


def sparsity_table(
  key: jax.Array,
  *,
  ns=(256, 1024),
  ds=(16, 64),
  sigmas=(1.0, 2.0, 3.0),
  eps: float = 0.01,
  k: int = 32,
  trials: int = 4,
) -> list[SparsityRow]:
  """Measures sparsity and top-k error on fresh Gaussian draws at each grid point."""
  rows = []
  for n in ns:
    for d in ds:
      for sigma in sigmas:
        key, sub = jax.random.split(key)
        mean_k, max_k, t, err, max_err, cert = _measure(
          sub, sigma, n=n, d=d, eps=eps, k=k, trials=trials
        )
        rows.append(
          SparsityRow(
            n,
            d,
            sigma,
            eps,
            int(1 / eps),
            float(mean_k),
            int(max_k),
            k,
            float(t),
            float(err),
            float(max_err),
            float(cert),
          )
        )
  return rows


def format_table(rows: list[SparsityRow]) -> str:
  """Markdown table of `sparsity_table` rows."""
  head = (
    "| n | d | sigma | eps | trivial k | mean min k | max min k | k | mean tail mass "
    "| mean error | max error | max certified error |"
  )
  sep = "|" + "---|" * 12
  lines = [head, sep]
  for r in rows:
    lines.append(
      f"| {r.n} | {r.d} | {r.sigma:g} | {r.eps:g} | {r.trivial_k} | {r.mean_min_k:.1f} "
      f"| {r.max_min_k} | {r.k} | {r.mean_tail_mass:.3g} | {r.mean_error:.3g} "
      f"| {r.max_error:.3g} | {r.max_certified_error:.3g} |"
    )
  return "\n".join(lines)
