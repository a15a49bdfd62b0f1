"""The two array namespaces that every bound formula is written against.

Each formula in `gsparse.bounds` is written once, for one point of its
arguments, against a namespace `xp` that has NumPy's array functions plus
the special functions and loops the formulas use. `JNP` runs it through
jax (so the public functions jit, vmap and differentiate); `NP` runs it
eagerly through NumPy and SciPy, with no compilation, which is what a call
on Python numbers wants (`_common._on_flat` chooses). `of(*args)` picks the
namespace from the arguments: jax as soon as one of them is a jax array or
tracer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special as sps
from jax.scipy import special as jsp


class _Namespace:
  """A module's functions plus a few extras under the same names for both backends."""

  def __init__(self, module, **extras):
    self._module = module
    self.__dict__.update(extras)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._module, name)


def _np_while_loop(cond, body, init):
  state = init
  while cond(state):
    state = body(state)
  return state


def _np_fori_loop(lo, hi, body, init):
  state = init
  for i in range(lo, hi):
    state = body(i, state)
  return state


def _np_cummax(x, axis, reverse=False):
  if reverse:
    return np.flip(np.maximum.accumulate(np.flip(x, axis), axis=axis), axis)
  return np.maximum.accumulate(x, axis=axis)


def _np_logsumexp(a, axis):
  """`log sum exp` over `axis`, shifted by the maximum, as `jax.nn.logsumexp` computes it.

  SciPy's version also separates the maximal terms (for a last bit of
  precision) at about three times the cost.
  """
  top = np.max(a, axis=axis, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def _jnp_cummax(x, axis, reverse=False):
  return jax.lax.cummax(x, axis=axis % x.ndim, reverse=reverse)


NP = _Namespace(
  np,
  betainc=sps.betainc,
  log_ndtr=sps.log_ndtr,
  ndtr=sps.ndtr,
  ndtri=sps.ndtri,
  logsumexp=_np_logsumexp,
  sigmoid=sps.expit,
  while_loop=_np_while_loop,
  fori_loop=_np_fori_loop,
  cummax=_np_cummax,
)

JNP = _Namespace(
  jnp,
  betainc=jsp.betainc,
  log_ndtr=jsp.log_ndtr,
  ndtr=jsp.ndtr,
  ndtri=jsp.ndtri,
  logsumexp=jax.nn.logsumexp,
  sigmoid=jax.nn.sigmoid,
  while_loop=jax.lax.while_loop,
  fori_loop=jax.lax.fori_loop,
  cummax=_jnp_cummax,
)


def of(*args) -> _Namespace:
  """`JNP` if any argument is a jax array (a tracer included), else `NP`."""
  return JNP if any(isinstance(a, jax.Array) for a in args) else NP
