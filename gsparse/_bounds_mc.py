"""Monte Carlo statistics of Gaussian-input attention matrices, for checking `gsparse.bounds`.

Used by gsparse/cli/verify_bounds.py and tests/bounds_test.py. One call draws
`num_matrices` independent inputs `X` (`[n, d]`, rows `N(0, sigma^2 I)`) for a
fixed head (`M`, `W_V`) and returns per-matrix summaries: the unit of failure
of Theorems 1 and 2 is a whole matrix ("every row"), so each statistic is the
worst row of its matrix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gsparse._numerics import top_k as _top_k
from gsparse.bounds.certificates import (
  band_count_tail_bound,
  band_counts,
  dyadic_band_ranks,
  multi_gap_tail_bound,
)
from gsparse.certificate import output_error_certificate, tail_mass_certificate

_BAND_WIDTH = 0.25  # nats; the band-count certificate is within e^0.25 = 1.28 (+ remainder)
_NUM_BANDS = 64  # 16 nats below s_{k+1}


class MatrixStats(NamedTuple):
  """Per-matrix worst-row statistics (leading axis: matrices).

  Attributes:
    max_count: `[R]` max over rows of `#{j : p_ij > eps}` (the true minimal k).
    max_tail: `[R, K]` max over rows of the top-k tail mass, per k in `ks`.
    max_error: `[R, K]` max over rows of `||o_i - o_i^{(k)}||_2`.
    max_value_norm: `[R]` `max_j ||v_j||`.
    cert_tail_excess: `[R, K]` max over rows of `(t - certificate) / certificate`
      (must be <= 0 up to rounding).
    cert_error_excess: `[R, K]` max over rows of `error - error certificate`.
    cert_tail_slack: `[R, K]` max over rows of `certificate / t` (tightness).
    multi_tail_excess: `[R, K]` max over rows of `(t - multi-gap) / multi-gap`, the
      multi-gap certificate on the dyadic ranks `k + 2^b <= min(4k, n)` (must be <= 0
      up to rounding).
    multi_tail_slack: `[R, K]` max over rows of `multi-gap / t`.
    band_tail_excess: `[R, K]` as `multi_tail_excess` for the band-count certificate
      (`_BAND_WIDTH`, `_NUM_BANDS` bands below `s_{k+1}`).
    band_tail_slack: `[R, K]` max over rows of `band-count / t`.
    median_log_ess: `[R]` median over rows of `log(1 / sum_j p_ij^2)`.
    median_tau: `[R]` median over rows of `tau_i = sigma ||M^T x_i||`.
    max_tau: `[R]` and min_tau: `[R]` over rows.
  """

  max_count: jax.Array
  max_tail: jax.Array
  max_error: jax.Array
  max_value_norm: jax.Array
  cert_tail_excess: jax.Array
  cert_error_excess: jax.Array
  cert_tail_slack: jax.Array
  multi_tail_excess: jax.Array
  multi_tail_slack: jax.Array
  band_tail_excess: jax.Array
  band_tail_slack: jax.Array
  median_log_ess: jax.Array
  median_tau: jax.Array
  max_tau: jax.Array
  min_tau: jax.Array


def _one_matrix(x, m, w_v, sigma, eps, ks):
  n = x.shape[0]
  s = x @ m @ x.T  # [n, n] scores
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[:, None])
  count = jnp.sum(p > eps, axis=-1)
  log_ess = -jnp.log(jnp.sum(p * p, axis=-1))
  tau = sigma * jnp.linalg.norm(x @ m, axis=-1)  # ||M^T x_i|| = ||x_i^T M||
  v = x @ w_v  # [n, hv]
  o = p @ v
  kmax = max(ks)
  vals, idx = _top_k(s, min(4 * kmax, n))
  tails, errs, cte, cee, slack, mte, mslack, bte, bslack = ([] for _ in range(9))
  for k in ks:
    head = idx[:, :k]
    rows = jnp.arange(n)[:, None]
    in_head = jnp.zeros((n, n), jnp.bool_).at[rows, head].set(True)
    lse_tail = jax.nn.logsumexp(jnp.where(in_head, -jnp.inf, s), axis=-1)
    t = jnp.exp(lse_tail - lse)
    head_lse = jax.nn.logsumexp(vals[:, :k], axis=-1)
    w = jnp.exp(vals[:, :k] - head_lse[:, None])
    o_k = jnp.einsum("nk,nkh->nh", w, v[head])
    err = jnp.linalg.norm(o - o_k, axis=-1)
    next_logit = vals[:, k] if k < n else jnp.full((n,), -jnp.inf)
    cert = tail_mass_certificate(head_lse, next_logit, n, k)
    ecert = output_error_certificate(cert[:, None], o_k[:, None, :], v[:, None, :])[:, 0]
    tails.append(jnp.max(t))
    errs.append(jnp.max(err))
    cte.append(jnp.max((t - cert) / jnp.maximum(cert, 1e-20)))
    cee.append(jnp.max(err - ecert))
    slack.append(jnp.max(jnp.where(t > 1e-30, cert / jnp.maximum(t, 1e-30), 1.0)))
    ranks = dyadic_band_ranks(k, max_rank=min(4 * k, n))
    multi = multi_gap_tail_bound(head_lse, vals[:, ranks - 1], n, k=k, band_ranks=ranks)
    mte.append(jnp.max((t - multi) / jnp.maximum(multi, 1e-20)))
    mslack.append(jnp.max(jnp.where(t > 1e-30, multi / jnp.maximum(t, 1e-30), 1.0)))
    counts = band_counts(s, ~in_head, next_logit, width=_BAND_WIDTH, num_bands=_NUM_BANDS)
    band = band_count_tail_bound(head_lse, next_logit, counts, width=_BAND_WIDTH)
    bte.append(jnp.max((t - band) / jnp.maximum(band, 1e-20)))
    bslack.append(jnp.max(jnp.where(t > 1e-30, band / jnp.maximum(t, 1e-30), 1.0)))
  return MatrixStats(
    jnp.max(count),
    jnp.stack(tails),
    jnp.stack(errs),
    jnp.max(jnp.linalg.norm(v, axis=-1)),
    jnp.stack(cte),
    jnp.stack(cee),
    jnp.stack(slack),
    jnp.stack(mte),
    jnp.stack(mslack),
    jnp.stack(bte),
    jnp.stack(bslack),
    jnp.median(log_ess),
    jnp.median(tau),
    jnp.max(tau),
    jnp.min(tau),
  )


@functools.partial(jax.jit, static_argnames=("n", "num_matrices", "ks", "batch_size"))
def matrix_stats(
  key: jax.Array,
  m: jax.Array,
  w_v: jax.Array,
  sigma: jax.Array,
  eps: jax.Array,
  *,
  n: int,
  num_matrices: int,
  ks: tuple[int, ...],
  batch_size: int = 1,
) -> MatrixStats:
  """Draws `num_matrices` inputs `X ~ N(0, sigma^2)^{n x d}` and summarises each matrix.

  Args:
    key: PRNG key.
    m: `[d, d]` interaction matrix `scale W_Q W_K^T` of one head.
    w_v: `[d, h_v]` value weights of that head.
    sigma: input standard deviation.
    eps: sparsity threshold.
    n: sequence length.
    num_matrices: number of independent matrices.
    ks: top-k sizes to check (each `< n`).
    batch_size: matrices processed together (memory `~ 3 batch_size n^2` floats).

  Returns:
    `MatrixStats` with leading axis `num_matrices`.
  """
  d = m.shape[0]
  keys = jax.random.split(key, num_matrices)

  def one(k):
    x = sigma * jax.random.normal(k, (n, d), jnp.float32)
    return _one_matrix(x, m, w_v, sigma, eps, ks)

  return jax.lax.map(one, keys, batch_size=batch_size)
