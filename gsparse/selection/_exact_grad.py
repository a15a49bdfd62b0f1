"""Derivatives of the fused exact route (`gsparse.selection.select_and_attend`).

The fused forward selects the top k of every row and attends over them with
the logits its chunk already holds; it is never differentiated itself.
`fused_attend` wraps it in a `jax.custom_jvp` whose tangent is the JVP of the
XLA sparse gather (`gsparse.gather.sparse_gather_attention_xla`) at the kept
indices, under `jax.checkpoint`:

  * the forward (plain, or the forward pass of `jax.grad`) is the fused chunk
    loop alone: no gather of the kept keys, no per-chunk residual;
  * reverse mode transposes that tangent: the backward re-gathers the kept
    keys and values of every query from the residuals, which are the inputs
    (query, key, value, bias, scale) and the `[batch..., T, N, k]` kept
    indices, O(n k) beyond the inputs, and scatter-adds dK and dV: the
    backward of `implementation="xla"`, run on the indices the fused pass
    found;
  * forward mode (`jax.jvp`, `jax.jacfwd`) and higher orders work, as the
    tangent is plain JAX.

The selection (indices, counts, the (k+1)-th logit, the row log-sum-exp) gets
no gradient: the outputs carry zero tangents. The gradient of the kept
attention is that of attention restricted to the kept keys: a key the row
does not keep (masked, `-inf` bias, or just not among the top k) is never
read, so a NaN there cannot reach dq; a fully masked row has zero gradient.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gsparse._layout import pad_axis
from gsparse.gather import sparse_gather_attention_xla
from gsparse.selection._common import gather_bias


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def fused_attend(fused, statics, query, key, value, bias, scale, mask, adm):
  """`fused(query, key, value, mask, bias, adm, scale, **dict(statics))` with the
  derivatives above.

  Args:
    fused: the fused forward (`gsparse.selection.exact._exact_heads` with a
      value): returns `(indices, *selection statistics, output, logsumexp)`,
      indices `[batch..., T, N, k]` first, output and log-sum-exp over the
      kept keys last.
    statics: its static keywords as a tuple of `(name, value)` pairs; one of
      them is `precision`.
    query, key, value: `[batch..., T, N, H]`, `[batch..., S, K, H]`,
      `[batch..., S, K, Hv]`.
    bias: None or broadcastable to `[batch..., N, T, S]` (checked, with
      `-inf` folded into the mask); differentiable.
    scale: the logit scale (differentiable where traced).
    mask, adm: the selection's masks (no gradient).

  Returns:
    `fused`'s outputs.
  """
  return fused(query, key, value, mask, bias, adm, scale, **dict(statics))


@fused_attend.defjvp
def _fused_attend_jvp(fused, statics, primals, tangents):
  outs = fused_attend(fused, statics, *primals)
  kept = functools.partial(kept_attention, outs[0], precision=dict(statics)["precision"])
  # Under checkpoint the forward keeps only the inputs and the indices; the
  # primal result of the gather is unused (dead code under jit).
  _, (d_out, d_lse) = jax.jvp(jax.checkpoint(kept), primals[:5], tangents[:5])
  *sel, out, lse = outs
  zeros = tuple(_zero_tangent(x) for x in sel)
  return outs, (*zeros, d_out.astype(out.dtype), d_lse.astype(lse.dtype))


# Gathered key (or value) entries per chunk of the backward: 8 MiB in float32.
CHUNK_ELEMENTS = 1 << 21


def kept_attention(idx, query, key, value, bias, scale, *, precision):
  """Attention over the kept keys `idx` by the XLA gather, in query chunks.

  `(output [batch..., T, N, Hv] in query.dtype, logsumexp [batch..., T, N])`.
  The rows go through `sparse_gather_attention_xla` in chunks of about
  `CHUNK_ELEMENTS` gathered key (or value) entries, each chunk under
  `jax.checkpoint`: the backward then holds one chunk's gathered rows at a
  time (plus the dK/dV accumulators) instead of `[T, N, k, H]` copies.
  """
  kept_bias = gather_bias(bias, idx, key.shape[-3])
  *batch, t, n, k = idx.shape
  per_row = max(1, math.prod(batch) * n * k * max(query.shape[-1], value.shape[-1]))
  c = max(1, min(t, CHUNK_ELEMENTS // per_row))
  nc = -(-t // c)

  def attend(xs):
    qc, ic, bc = xs
    res = sparse_gather_attention_xla(qc, key, value, ic, bc, scale, precision)
    return res.output, res.logsumexp

  if nc == 1:
    return attend((query, idx, kept_bias))
  lead = len(batch)

  def split(x, fill):  # [*batch, T, N, m] -> [nc, *batch, c, N, m]
    x = pad_axis(x, lead, nc * c, fill)
    return jnp.moveaxis(x.reshape(*batch, nc, c, *x.shape[lead + 1 :]), lead, 0)

  def join(x):  # the inverse, padding dropped
    x = jnp.moveaxis(x, 0, lead)
    return x.reshape(*batch, nc * c, *x.shape[lead + 2 :])[(slice(None),) * lead + (slice(0, t),)]

  xs = (split(query, 0), split(idx, -1), None if kept_bias is None else split(kept_bias, 0))
  out, lse = jax.lax.map(jax.checkpoint(attend), xs)
  return join(out), join(lse)


def _zero_tangent(x: jax.Array):
  """The zero tangent of an output without gradient (float0 for integers).

  Under `jax.shard_map` a tangent must vary over the same manual mesh axes as
  its primal; `zeros_like` inherits them, a float0 constant is cast to them.
  """
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  z = np.zeros(x.shape, jax.dtypes.float0)
  vma = _varying_axes(x)
  return _to_varying(z, vma) if vma else z


def _varying_axes(x) -> tuple:
  """The manual mesh axes `x` varies over (`aval.mat.varying`; `aval.vma` in older jax)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  axes = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
  return tuple(sorted(axes or ()))


def _to_varying(z, axes):
  """`z` marked as varying over the manual mesh `axes` (jax's pcast, or pvary before it)."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(z, axes, to="varying")
  return jax.lax.pvary(z, axes)
