"""One bounded store for NumPy results, keyed on the bits of their arguments.

The NumPy path of the bounds (a call on Python numbers) keeps a few results
between calls that depend on `n`, `delta` or the norms but not on `sigma`:
binomial-tail rows (`_xp`), G-cell tails (`_gcells`), ladder band masses
(`_laplace`), the isotropic quadratic-form levels (`_iso_events`) and the roots
behind `_xp.memo_scalar`. Each is a `Memo`:

- the key of an argument is its dtype, shape and bytes (`key`), so `-0.0` and
  `0.0`, two NaN payloads or a float32 and a float64 of the same value never meet;
- a value handed in is frozen: every NumPy array in it is made read-only, so no
  caller can change what a later call reads back;
- `max_bytes` bounds the bytes of the arrays and `bytes` held in keys and values
  together; past it the least recently used entries go first, and a single entry
  larger than the whole store is returned without being kept;
- one lock per store: several threads may share it (each call reads an entry once);
- `clear()` empties a store, `disabled()` (or `_ENABLED = False`) turns every store
  off: nothing is read or kept, each call computes afresh (the tests compare the two).

A kept value is the very object the computation returned, so a call gets the same
bits whether its parts are read back or computed.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

_ENABLED = True  # False: every store is skipped (read nothing, keep nothing)


def key(*values) -> tuple:
  """A dict key of NumPy values (None stays None): each one's dtype, shape and bytes."""
  out = []
  for v in values:
    if v is None:
      out.append(None)
    else:
      a = np.asarray(v)
      out.append((a.dtype.str, a.shape, a.tobytes()))
  return tuple(out)


def _nbytes(obj) -> int:
  """Bytes of the arrays, NumPy scalars and `bytes` in `obj` (tuples and lists searched)."""
  if isinstance(obj, (np.ndarray, np.generic)):
    return obj.nbytes
  if isinstance(obj, bytes):
    return len(obj)
  if isinstance(obj, (tuple, list)):
    return sum(_nbytes(v) for v in obj)
  return 0


def _freeze(obj) -> None:
  if isinstance(obj, np.ndarray):
    obj.flags.writeable = False
  elif isinstance(obj, (tuple, list)):
    for v in obj:
      _freeze(v)


class Memo:
  """A store of at most `max_bytes` (keys and values), least recently used out first.

  Values must not be None (None means "not kept").
  """

  def __init__(self, max_bytes: int):
    self.max_bytes = int(max_bytes)
    self.nbytes = 0
    self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._items)

  def clear(self) -> None:
    with self._lock:
      self._items.clear()
      self.nbytes = 0

  def get_many(self, keys) -> list:
    """The values kept under `keys` (None where none is), each now the most recently used."""
    if not _ENABLED:
      return [None] * len(keys)
    out = []
    with self._lock:
      for k in keys:
        item = self._items.get(k)
        if item is not None:
          self._items.move_to_end(k)
        out.append(None if item is None else item[0])
    return out

  def put(self, k: Hashable, value):
    """Keeps `value` (frozen) under `k`, evicting the least recently used past `max_bytes`."""
    _freeze(value)
    size = _nbytes(k) + _nbytes(value)
    if not _ENABLED or size > self.max_bytes:
      return value
    with self._lock:
      old = self._items.pop(k, None)
      self.nbytes += size - (0 if old is None else old[1])
      while self.nbytes > self.max_bytes:
        self.nbytes -= self._items.popitem(last=False)[1][1]
      self._items[k] = (value, size)
    return value

  def lookup(self, k: Hashable, compute: Callable[[], Any]):
    """The value kept under `k`, or `compute()` kept (the same object) and returned."""
    (value,) = self.get_many((k,))
    return self.put(k, compute()) if value is None else value


@contextlib.contextmanager
def disabled() -> Iterator[None]:
  """Every store off inside the block (process-wide, not per thread)."""
  global _ENABLED
  before, _ENABLED = _ENABLED, False
  try:
    yield
  finally:
    _ENABLED = before
