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


def _is_float_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def checked(fn: Callable[..., Any], *, allow_neg_inf: Collection[str] = ("bias",)) -> Callable:
  """Wraps `fn` so that non-finite inputs and NaN outputs raise an error.

  Every floating array among the arguments of a call (found through
  `inspect.signature(fn)`, including the leaves of pytree arguments such as
  `gsparse.Weights`) is checked for NaN and Inf; arguments named in
  `allow_neg_inf` may hold `-inf` (the way a bias masks keys). Every floating
  leaf of the result is checked for NaN. Python scalars are checked at trace
  time by the function itself; masks and indices are not floating and are not
  checked.

  Call the wrapper eagerly (it may wrap a jitted function:
  `checked(jax.jit(f))`), or under `checkify.checkify` to get the error as a
  value inside a larger jitted program.

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

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    names, leaves, slots = [], [], []
    per_arg = {}
    for name, value in bound.arguments.items():
      flat, treedef = jax.tree_util.tree_flatten_with_path(value)
      per_arg[name] = ([leaf for _, leaf in flat], treedef)
      for i, (path, leaf) in enumerate(flat):
        if _is_float_array(leaf):
          names.append(name + jax.tree_util.keystr(path))
          leaves.append(leaf)
          slots.append((name, i))

    def run(arrays):
      for label, x in zip(names, arrays, strict=True):
        x = jnp.asarray(x)
        bad = jnp.isnan(x) | (x == jnp.inf)
        if label.split(".")[0].split("[")[0] not in allow_neg_inf:
          bad = bad | (x == -jnp.inf)
        count = jnp.sum(bad, dtype=jnp.int32)
        checkify.check(count == 0, f"{label} contains {{count}} NaN or Inf values", count=count)
      filled = {name: list(flat) for name, (flat, _) in per_arg.items()}
      for (name, i), x in zip(slots, arrays, strict=True):
        filled[name][i] = x
      for name, (_, treedef) in per_arg.items():
        bound.arguments[name] = jax.tree_util.tree_unflatten(treedef, filled[name])
      out = fn(*bound.args, **bound.kwargs)
      for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
          count = jnp.sum(jnp.isnan(leaf), dtype=jnp.int32)
          label = "output" + jax.tree_util.keystr(path)
          checkify.check(count == 0, f"{label} contains {{count}} NaN values", count=count)
      return out

    err, out = checkify.checkify(run, errors=checkify.user_checks)(leaves)
    checkify.check_error(err)
    return out

  return wrapper
