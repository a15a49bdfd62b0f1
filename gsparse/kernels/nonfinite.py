"""Non-finite values inside a contraction whose weights are zero at masked entries.

`p @ v` with `p = 0` at a masked entry still gives `0 * NaN = NaN` (and
`0 * inf = NaN`) when that entry's row of `v` is not finite. Where the mask is
per key, the callers zero those rows of `v` (`gather_kv`); where it differs
between the queries of one tile (causal masking inside a key block), they
contract the finite part instead and mark the results that read a non-finite
row with one extra indicator product over the tile:

  out = p @ finite_part(v);  out = poison(out, reads(valid, v))

so the cost is one more `[block_q, block_k] x [block_k, Hv]` product, no
per-query copy of `v`. A read non-finite value gives NaN (not the `+-inf` of
`w * inf`): docs/errors.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def finite_part(x: jax.Array) -> jax.Array:
  """`x` with every NaN and `+-inf` set to zero (zero gradient there)."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def nonfinite_indicator(x: jax.Array) -> jax.Array:
  """float32 1 where `x` is NaN or `+-inf`, else 0."""
  return jnp.where(jnp.isfinite(x), 0.0, 1.0).astype(jnp.float32)


def poison(out: jax.Array, reads: jax.Array) -> jax.Array:
  """NaN where `reads > 0` (a row read a non-finite entry), else `out`; NaN in `out` stays."""
  return jnp.where(reads > 0, jnp.asarray(jnp.nan, out.dtype), out)
