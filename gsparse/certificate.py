"""The a-posteriori certificate: deterministic bounds from a kept set.

The one lemma behind every selection's bound (`kept_set_tail_bound`): for
one attention row, let `K` be ANY set of kept admissible keys with
log-sum-exp `L_K = log sum_{j in K} exp(s_j)` of their logits, let `m` be
the number of admissible keys outside `K` and `u` an upper bound on each of
their logits. The softmax mass `t` outside `K` is `D / (e^{L_K} + D)` with
`D = sum_{j not in K} exp(s_j) <= m e^u`, and `x -> x / (e^{L_K} + x)` is
increasing, hence

    t <= m e^u / (e^{L_K} + m e^u) = sigmoid(log m + u - L_K).

Nothing in it depends on how `K` was chosen or on the sign of the scale: the
exact top-k (`u` = the (k+1)-th logit), a block selection (`u` = the largest
certified block bound among dropped blocks) and LSH (`u` = a bound on the
logits never scored) all use this one function.

With the exact error identity `o - o_K = t (mu_tail - mu_head)` (mu_head =
o_K, the kept-set output, and mu_tail a convex combination of value rows) and
any centre `c` with `R = max_j ||v_j - c||`,

    ||o - o_K|| <= t (||o_K - c|| + R).

Both statements are proven in docs/theory.md. Nothing here is random: the
certificate can never be violated (up to floating-point rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse._admissible import Admissible, and_masks, dense_mask
from gsparse._numerics import safe_norm
from gsparse.attention import combine_masks


def kept_set_tail_bound(
  kept_lse: ArrayLike, dropped_upper: ArrayLike, num_dropped: ArrayLike
) -> jax.Array:
  """Upper bound on the softmax mass outside any kept set of a row.

  Lemma (proof in docs/theory.md): let a row have logits `s_j` over its
  admissible keys, `K` any subset of them with `L_K = log sum_{j in K}
  exp(s_j)`, `m` the number of admissible keys outside `K`, and `u >= s_j`
  for every admissible `j` outside `K`. Then the softmax mass outside `K`,
  `t = sum_{j not in K} e^{s_j} / sum_j e^{s_j}`, satisfies

      t <= m e^u / (e^{L_K} + m e^u) = sigmoid(log m + u - L_K).

  Computed in log space (`sigmoid` of a difference of logs), so logits of any
  size, of either sign, and any scale sign are safe. Edge cases, each what
  the lemma gives or the only honest answer:

  * `m == 0` or `u == -inf`: nothing with weight is dropped: exactly 0 (even
    when `K` is empty too: a fully masked row).
  * `L_K == -inf` (an empty kept set) with something dropped: 1.
  * `u == +inf` with something dropped and `L_K` finite: 1.
  * `L_K` NaN (a NaN logit or value reached the kept set) or `L_K == +inf`:
    NaN; `u` NaN with `m > 0` (a NaN logit among the dropped keys): NaN. A NaN
    output never gets a finite certificate.

  Args:
    kept_lse: `L_K`, the log-sum-exp of the kept logits.
    dropped_upper: `u`, an upper bound on every dropped admissible logit.
    num_dropped: `m >= 0`, the number of admissible keys not kept.

  Returns:
    The bound, in `[0, 1]` or NaN, broadcast over the arguments, in at least
    float32.
  """
  kept_lse = jnp.asarray(kept_lse)
  dtype = jnp.promote_types(jnp.result_type(kept_lse, dropped_upper), jnp.float32)
  kept_lse = kept_lse.astype(dtype)
  u = jnp.asarray(dropped_upper, dtype)
  m = jnp.asarray(num_dropped, dtype)
  has_tail = (m > 0) & (u != -jnp.inf)
  log_tail = jnp.log(jnp.where(has_tail, m, 1.0)) + jnp.where(has_tail, u, 0.0)
  finite_head = jnp.isfinite(kept_lse)
  bound = jax.nn.sigmoid(log_tail - jnp.where(finite_head, kept_lse, 0.0))
  bound = jnp.where(finite_head, bound, 1.0)  # L_K = -inf: only the tail has mass
  bound = jnp.where(has_tail, bound, 0.0)
  undefined = jnp.isnan(kept_lse) | (kept_lse == jnp.inf) | (jnp.isnan(u) & (m > 0))
  return jnp.where(undefined, jnp.nan, bound)


def tail_mass_certificate(
  head_logsumexp: ArrayLike, next_logit: ArrayLike, num_keys: ArrayLike, k: ArrayLike
) -> jax.Array:
  """Upper bound on the softmax mass outside the top-k set of a row.

  `kept_set_tail_bound` for the exact top-k: the kept set is the top-k and
  every dropped logit is at most the (k+1)-th, `s_{k+1}`.

  Args:
    head_logsumexp: `log sum_{j in top-k} exp(s_j)` (may be `-inf` for an empty row).
    next_logit: the (k+1)-th largest admissible logit `s_{k+1}` (any value
      when `num_keys <= k`).
    num_keys: number of admissible keys `m` in the row.
    k: number of kept keys.

  Returns:
    The bound, in `[0, 1]` (NaN for NaN data, see `kept_set_tail_bound`),
    broadcast over the arguments; exactly 0 when `num_keys <= k` or
    `next_logit == -inf` (nothing with weight is dropped).

  Example:
    Logits `(log 2, 0, 0)` and k = 1: the kept mass is `H = 2`, the two dropped
    keys weigh at most `2 exp(0)`, so `t <= 2 / (2 + 2) = 0.5` (here exact).

    >>> import math
    >>> from gsparse import certificate
    >>> bound = certificate.tail_mass_certificate(math.log(2.0), 0.0, num_keys=3, k=1)
    >>> round(float(bound), 6)
    0.5
  """
  dropped = jnp.asarray(num_keys) - jnp.asarray(k)
  return kept_set_tail_bound(head_logsumexp, next_logit, jnp.maximum(dropped, 0))


def value_center_and_radius(value: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Centre (mean row) and radius `max_j ||v_j - c||` of the finite value rows.

  A value row with a NaN or `+-inf` entry is left out: a row that may attend
  it has no finite error, and `output_error_certificate` reports NaN there
  (Lemma C5 in docs/theory.md), so the radius stays finite for the others.

  Args:
    value: `[batch..., S, K, Hv]`.

  Returns:
    `(center [batch..., K, Hv], radius [batch..., K])` in at least float32
    (zeros for a head without a finite row). All finite rows are used, so the
    radius is a valid bound for any mask.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse import certificate
    >>> value = jnp.array([[0.0, 0.0], [2.0, 0.0], [jnp.inf, 0.0]])[:, None, :]  # S=3, K=1
    >>> c, r = certificate.value_center_and_radius(value)
    >>> c.tolist(), r.tolist()
    ([[1.0, 0.0]], [1.0])
  """
  value = _checks.check_float_array("value", value, min_ndim=3)
  value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
  ok = jnp.all(jnp.isfinite(value), axis=-1, keepdims=True)  # [..., S, K, 1]
  count = jnp.maximum(jnp.sum(ok, axis=-3), 1)
  center = jnp.sum(jnp.where(ok, value, 0.0), axis=-3) / count
  dist = safe_norm(jnp.where(ok, value - center[..., None, :, :], 0.0))
  return center, jnp.max(dist, axis=-2)


def nonfinite_value_reach(
  value: jax.Array,
  mask: jax.Array | None,
  *,
  is_causal: bool,
  num_queries: int,
  num_heads: int,
  adm: Admissible | None = None,
) -> jax.Array:
  """`[batch..., T, N]` True where a query may attend a value row with a NaN or `+-inf`.

  Args:
    value: `[batch..., S, K, Hv]`.
    mask: admissibility broadcastable to `[batch..., N, T, S]` (a `-inf`
      bias already folded in, `gsparse.attention.fold_neg_inf_bias`), or
      None.
    is_causal: also mask key position > query position (top-left aligned).
    num_queries: `T`.
    num_heads: `N`, a multiple of `K`.
    adm: index-range masks (lengths, window, segment ids;
      `gsparse._admissible`), or None: a row never reaches a value row they
      exclude (a NaN in padding past `key_value_seq_lengths` is harmless).

  The `[T, S]` contraction with the mask (and the dense form of `adm`) runs
  only when some value row is not finite.
  """
  *batch, s, kh, _ = value.shape
  t, n = num_queries, num_heads
  bad = jnp.repeat(jnp.any(~jnp.isfinite(value), axis=-1), n // kh, axis=-1)  # [..., S, N]
  mask = combine_masks(mask, is_causal, t, s)
  if mask is None and adm is None:
    return jnp.broadcast_to(jnp.any(bad, axis=-2)[..., None, :], (*batch, t, n))
  badn = jnp.swapaxes(bad, -1, -2)  # [..., N, S]

  def reach():
    full = mask if adm is None else and_masks(mask, dense_mask(adm, tuple(batch), t, s))
    full = jnp.broadcast_to(full, (*batch, n, t, s)).astype(jnp.float32)
    count = jnp.einsum("...nts,...ns->...tn", full, badn.astype(jnp.float32))
    return count > 0

  return jax.lax.cond(jnp.any(bad), reach, lambda: jnp.zeros((*batch, t, n), bool))


def output_error_certificate(
  tail_bound: ArrayLike,
  topk_output: ArrayLike,
  value: ArrayLike,
  *,
  value_reach: ArrayLike | None = None,
) -> jax.Array:
  """Upper bound on `||o - o_k||_2` per query from the tail-mass bound.

  Lemma C0 with the centre and radius of the finite value rows
  (`value_center_and_radius`); a row that may attend a non-finite value row
  gets NaN (Lemma C5 in docs/theory.md: its dense output is not finite).

  Args:
    tail_bound: `[batch..., T, N]` bound on the dropped mass `t`.
    topk_output: `[batch..., T, N, Hv]` the top-k output `o_k` (= mu_head).
    value: `[batch..., S, K, Hv]` all value rows, `N % K == 0`.
    value_reach: `[batch..., T, N]` bool, True where the row may attend
      (under its mask, causality and bias) a value row with a NaN or `+-inf`
      entry (`nonfinite_value_reach`). None: every row of a head with such a
      value row (valid for any mask).

  Returns:
    `[batch..., T, N]` bound `t (||o_k - c|| + R)`, NaN where `value_reach`.

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
  if value_reach is None:
    value_reach = nonfinite_value_reach(
      jnp.asarray(value), None, is_causal=False, num_queries=tail_bound.shape[-2], num_heads=n
    )
  center = jnp.repeat(center, n // kh, axis=-2)  # [..., N, Hv]
  radius = jnp.repeat(radius, n // kh, axis=-1)  # [..., N]
  dist = safe_norm(topk_output.astype(center.dtype) - center[..., None, :, :])
  bound = tail_bound * (dist + radius[..., None, :])
  return jnp.where(value_reach, jnp.asarray(jnp.nan, bound.dtype), bound)
