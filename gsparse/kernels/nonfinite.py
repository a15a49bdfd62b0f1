"""Non-finite values inside a contraction whose weights are zero at masked entries.

`p @ v` with `p = 0` at a masked entry still gives `0 * NaN = NaN` (and
`0 * inf = NaN`) when that entry's row of `v` is not finite. Where the mask is
per key, the callers zero those rows of `v` (`gather_kv`); where it differs
between the queries of one tile (causal masking inside a key block), they
contract the finite part instead and count, per output entry, the non-finite
entries it reads and their infinite signs with two indicator products over
the tile:

  out = p @ finite_part(v)
  reads = live @ nonfinite_indicator(v);  signs = live @ inf_sign(v)
  out = resolve_reads(out, reads, signs)

(`live`: the admissible entries whose logit is not `-inf`, the ones with
positive weight). So the cost is two more `[block_q, block_k] x
[block_k, Hv]` products, no per-query copy of `v`, and the result is what
dense attention gives in exact arithmetic: `+inf` where a row reads only
`+inf` non-finite entries, `-inf` where only `-inf`, NaN where it reads a NaN
or both signs (docs/errors.md). The counts are small integers, exact in
float32 up to 2^24 keys.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def finite_part(x: jax.Array) -> jax.Array:
  """`x` with every NaN and `+-inf` set to zero (zero gradient there)."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def nonfinite_indicator(x: jax.Array) -> jax.Array:
  """float32 1 where `x` is NaN or `+-inf`, else 0."""
  return jnp.where(jnp.isfinite(x), 0.0, 1.0).astype(jnp.float32)


def inf_sign(x: jax.Array) -> jax.Array:
  """float32 +1 where `x` is `+inf`, -1 where `-inf`, else 0 (NaN included)."""
  return jnp.where(x == jnp.inf, 1.0, jnp.where(x == -jnp.inf, -1.0, 0.0)).astype(jnp.float32)


def resolve_reads(out: jax.Array, reads: jax.Array, signs: jax.Array) -> jax.Array:
  """`out` corrected for the non-finite entries its rows read.

  Args:
    out: the contraction over the finite parts.
    reads: number of non-finite entries read (`live @ nonfinite_indicator`).
    signs: their summed infinite signs (`live @ inf_sign`).

  Returns:
    `out` where nothing non-finite was read; `+inf` (`-inf`) where every
    entry read was `+inf` (`-inf`); NaN where a NaN or both signs were read.
    A NaN already in `out` (a NaN logit) stays NaN.
  """
  # Both constants are literals: Triton's lowering cannot negate a constant.
  inf, neg_inf = jnp.asarray(jnp.inf, out.dtype), jnp.asarray(-jnp.inf, out.dtype)
  fix = jnp.where(signs == reads, inf, jnp.where(signs == -reads, neg_inf, jnp.nan))
  return jnp.where((reads > 0) & ~jnp.isnan(out), fix.astype(out.dtype), out)


def ieee_where_nonfinite(finite: jax.Array, raw: Callable[[], jax.Array], bad: jax.Array):
  """`finite` where `bad` is False, the IEEE result `raw()` (no gradient) where True.

  `finite` is a contraction over finite parts (zero gradient into masked
  non-finite entries), `raw` the same contraction over the raw inputs; it is
  only evaluated when some entry is `bad` (outside `vmap`).
  """
  bad = jnp.broadcast_to(bad, finite.shape)
  use_raw = lambda: jnp.where(bad, jax.lax.stop_gradient(raw()).astype(finite.dtype), finite)
  return jax.lax.cond(jnp.any(bad), use_raw, lambda: finite)
