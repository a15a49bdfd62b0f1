"""The a-posteriori certificate: deterministic bounds from the top-(k+1) logits.

For one attention row with logits `s_1 >= s_2 >= ... >= s_m` over its `m`
admissible keys, let `H = sum_{j <= k} exp(s_j)` be the mass of the kept
(top-k) set and `t` the softmax mass outside it. Every dropped logit is at
most `s_{k+1}`, so

    t = T / (H + T)  with  T = sum_{j > k} exp(s_j) <= (m - k) exp(s_{k+1}),

and `x -> x / (H + x)` is increasing, hence

    t <= (m - k) exp(s_{k+1}) / (H + (m - k) exp(s_{k+1})).

With the exact error identity `o - o_k = t (mu_tail - mu_head)` (mu_head = o_k,
the top-k output, and mu_tail a convex combination of value rows) and any
centre `c` with `R = max_j ||v_j - c||`,

    ||o - o_k|| <= t (||o_k - c|| + R).

Both statements are proven in docs/theory.md. Nothing here is random: the
certificate can never be violated (up to floating-point rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse._numerics import safe_norm


def tail_mass_certificate(
  head_logsumexp: ArrayLike, next_logit: ArrayLike, num_keys: ArrayLike, k: ArrayLike
) -> jax.Array:
  """Upper bound on the softmax mass outside the top-k set of a row.

  Args:
    head_logsumexp: `log sum_{j in top-k} exp(s_j)` (may be `-inf` for an empty row).
    next_logit: the (k+1)-th largest admissible logit `s_{k+1}` (any value
      when `num_keys <= k`).
    num_keys: number of admissible keys `m` in the row.
    k: number of kept keys.

  Returns:
    The bound, in `[0, 1]`, broadcast over the arguments; exactly 0 when
    `num_keys <= k` or `next_logit == -inf` (nothing with weight is dropped).

  Example:
    Logits `(log 2, 0, 0)` and k = 1: the kept mass is `H = 2`, the two dropped
    keys weigh at most `2 exp(0)`, so `t <= 2 / (2 + 2) = 0.5` (here exact).

    >>> import math
    >>> from gsparse import certificate
    >>> bound = certificate.tail_mass_certificate(math.log(2.0), 0.0, num_keys=3, k=1)
    >>> round(float(bound), 6)
    0.5
  """
  head_logsumexp = jnp.asarray(head_logsumexp)
  dtype = jnp.promote_types(head_logsumexp.dtype, jnp.float32)
  head_logsumexp = head_logsumexp.astype(dtype)
  next_logit = jnp.asarray(next_logit, dtype)
  dropped = jnp.asarray(num_keys, dtype) - jnp.asarray(k, dtype)
  # A (k+1)-th logit of -inf (a -inf bias) means every dropped key has zero
  # weight: the tail is exactly empty even if the kept set is empty as well.
  has_tail = (dropped > 0) & (next_logit != -jnp.inf)
  log_tail = jnp.log(jnp.where(has_tail, dropped, 1.0)) + jnp.where(has_tail, next_logit, 0.0)
  head = jnp.where(has_tail & jnp.isfinite(head_logsumexp), head_logsumexp, 0.0)
  bound = jax.nn.sigmoid(log_tail - head)
  bound = jnp.where(jnp.isfinite(head_logsumexp), bound, 1.0)
  bound = jnp.where(jnp.isnan(head_logsumexp) | jnp.isnan(next_logit), jnp.nan, bound)
  return jnp.where(has_tail, bound, 0.0)


def value_center_and_radius(value: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Centre (mean row) and radius `max_j ||v_j - c||` of the value rows.

  Args:
    value: `[batch..., S, K, Hv]`.

  Returns:
    `(center [batch..., K, Hv], radius [batch..., K])` in at least float32.
    All keys are used, so the radius is a valid bound for any mask.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse import certificate
    >>> value = jnp.array([[0.0, 0.0], [2.0, 0.0]])[:, None, :]  # S=2, K=1, Hv=2
    >>> c, r = certificate.value_center_and_radius(value)
    >>> c.tolist(), r.tolist()
    ([[1.0, 0.0]], [1.0])
  """
  value = _checks.check_float_array("value", value, min_ndim=3)
  value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
  center = jnp.mean(value, axis=-3)
  radius = jnp.max(safe_norm(value - center[..., None, :, :]), axis=-2)
  return center, radius


def output_error_certificate(
  tail_bound: ArrayLike, topk_output: ArrayLike, value: ArrayLike
) -> jax.Array:
  """Upper bound on `||o - o_k||_2` per query from the tail-mass bound.

  Args:
    tail_bound: `[batch..., T, N]` bound on the dropped mass `t`.
    topk_output: `[batch..., T, N, Hv]` the top-k output `o_k` (= mu_head).
    value: `[batch..., S, K, Hv]` all value rows, `N % K == 0`.

  Returns:
    `[batch..., T, N]` bound `t (||o_k - c|| + R)`.

  Example:
    Values 0 and 2 (centre 1, radius 1), top-k output 0, tail bound 0.5:
    the bound is `0.5 * (1 + 1) = 1`.

    >>> import jax.numpy as jnp
    >>> from gsparse import certificate
    >>> value = jnp.array([[0.0], [2.0]])[:, None, :]  # [S=2, K=1, Hv=1]
    >>> certificate.output_error_certificate(
    ...   jnp.full((1, 1), 0.5), jnp.zeros((1, 1, 1)), value
    ... ).tolist()
    [[1.0]]
  """
  tail_bound = _checks.check_float_array("tail_bound", tail_bound)
  topk_output = _checks.check_float_array("topk_output", topk_output, min_ndim=3)
  center, radius = value_center_and_radius(value)
  n, kh = topk_output.shape[-2], center.shape[-2]
  if (
    topk_output.ndim != center.ndim + 1
    or topk_output.shape[-1] != center.shape[-1]
    or n % kh
    or tail_bound.shape != topk_output.shape[:-1]
  ):
    raise ValueError(
      "output_error_certificate needs tail_bound [batch..., T, N], topk_output "
      "[batch..., T, N, Hv] and value [batch..., S, K, Hv] with N % K == 0, got "
      f"tail_bound.shape={tail_bound.shape}, topk_output.shape={topk_output.shape}, "
      f"value.shape={jnp.shape(value)}"
    )
  center = jnp.repeat(center, n // kh, axis=-2)  # [..., N, Hv]
  radius = jnp.repeat(radius, n // kh, axis=-1)  # [..., N]
  dist = safe_norm(topk_output.astype(center.dtype) - center[..., None, :, :])
  return tail_bound * (dist + radius[..., None, :])
