"""Checked mode: find NaN and Inf in the data, naming the argument.

gsparse's policy for non-finite data (docs/errors.md):

  * By default nothing is checked at run time and non-finite values propagate:
    a NaN or Inf that enters the computation of an output makes that output
    NaN (or Inf); it is never silently replaced by a finite number. Which
    outputs it reaches depends on what the function reads (dense attention reads
    every value row, top-k attention only the selected ones).
  * A bias of `-inf` is not an error: it masks that key, exactly like
    `mask=False` (a row with every key at `-inf` is a fully masked row).
  * `checked(fn)` wraps any gsparse function (or a user function built on them,
    jitted or not) so that a NaN or Inf in a floating argument, or a NaN in the
    result, raises `jax.experimental.checkify.JaxRuntimeError` whose message
    names the argument. The checks run inside `checkify.checkify`, so they cost
    one reduction per argument and work with jitted `fn`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_CACHE_SIZE = 64


class _ArraySlot:
  """Marks where an array argument goes among the static leaves."""

  def __repr__(self):
    return "<array>"


_ARRAY = _ArraySlot()


def _is_float_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def checked(fn: Callable[..., Any], *, allow_neg_inf: Collection[str] = ("bias",)) -> Callable:
  """Wraps `fn` so that non-finite inputs and NaN outputs raise an error.

  Every floating array among the arguments of a call (found through
  `inspect.signature(fn)`, including the leaves of pytree arguments such as
  `gsparse.gaussian.Weights`) is checked for NaN and Inf; arguments named in
  `allow_neg_inf` may hold `-inf` (the way a bias masks keys). Every floating
  leaf of the result is checked for NaN. Python scalars are checked at trace
  time by the function itself; masks and indices are not floating and are not
  checked.

  The wrapper jit-compiles `fn` with its checks once per static
  configuration (the non-array arguments, which must be hashable to be
  cached, and the array shapes), so `fn` must be traceable by `jax.jit`. Call
  the wrapper eagerly, or under `checkify.checkify` to get the error as a value
  inside a larger jitted program.

  Args:
    fn: the function to wrap.
    allow_neg_inf: names of arguments in which `-inf` is allowed.

  Returns:
    A function with the signature of `fn`.

  Raises (from the wrapper):
    checkify.JaxRuntimeError: "<argument> contains N NaN or Inf values" or
      "output<path> contains N NaN values".

  Example:
    >>> import jax.numpy as jnp, gsparse
    >>> q = jnp.ones((2, 1, 4)).at[0, 0, 0].set(jnp.nan)
    >>> k = v = jnp.ones((3, 1, 4))
    >>> gsparse.checked(gsparse.dot_product_attention)(q, k, v)
    Traceback (most recent call last):
      ...
    jax._src.checkify.JaxRuntimeError: query contains 1 NaN or Inf values...
  """
  signature = inspect.signature(fn)
  allow_neg_inf = frozenset(allow_neg_inf)
  cache: dict[Any, Callable] = {}

  def build(treedef, statics, labels, neg_inf_ok):
    """The jitted, checkified function for one static configuration."""

    def run(arrays):
      for label, ok, x in zip(labels, neg_inf_ok, arrays, strict=True):
        if label is None:  # not floating: nothing to check
          continue
        bad = jnp.isnan(x) | (x == jnp.inf)
        if not ok:
          bad = bad | (x == -jnp.inf)
        count = jnp.sum(bad, dtype=jnp.int32)
        checkify.check(count == 0, f"{label} contains {{count}} NaN or Inf values", count=count)
      it = iter(arrays)
      leaves = [next(it) if s is _ARRAY else s for s in statics]
      arguments = jax.tree_util.tree_unflatten(treedef, leaves)
      bound = inspect.BoundArguments(signature, arguments)
      out = fn(*bound.args, **bound.kwargs)
      for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
          count = jnp.sum(jnp.isnan(leaf), dtype=jnp.int32)
          label = "output" + jax.tree_util.keystr(path)
          checkify.check(count == 0, f"{label} contains {{count}} NaN values", count=count)
      return out

    return jax.jit(checkify.checkify(run, errors=checkify.user_checks))

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(dict(bound.arguments))
    arrays, statics, labels, neg_inf_ok = [], [], [], []
    for path, leaf in flat:
      if isinstance(leaf, (jax.Array, np.ndarray)):
        arrays.append(leaf)
        statics.append(_ARRAY)
        name = path[0].key  # the argument's name (a DictKey)
        labels.append(name + jax.tree_util.keystr(path[1:]) if _is_float_array(leaf) else None)
        neg_inf_ok.append(name in allow_neg_inf)
      else:
        statics.append(leaf)
    key = (treedef, tuple(statics), tuple(labels), tuple(neg_inf_ok))
    try:
      checked_fn = cache.get(key)
    except TypeError:  # an unhashable static argument: no caching
      key, checked_fn = None, None
    if checked_fn is None:
      checked_fn = build(*key) if key is not None else build(treedef, statics, labels, neg_inf_ok)
      if key is not None and len(cache) < _CACHE_SIZE:
        cache[key] = checked_fn
    err, out = checked_fn(arrays)
    checkify.check_error(err)
    return out

  return wrapper
