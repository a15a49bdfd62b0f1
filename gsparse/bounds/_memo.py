"""One bounded store for NumPy results, keyed on the bits of their arguments.

The NumPy path of the bounds keeps a few results between calls that depend on `n`, `delta`
or the norms but not on `sigma` (binomial rows, G-cell tails, band masses, quadratic-form
levels, `_xp.memo_scalar`'s roots), each in a `Memo`. The key of an argument is its dtype,
shape and bytes (`key`: `-0.0` and `0.0`, or a float32 and a float64, never meet; `_xp`'s
binomial rows are keyed on Python floats instead, where `+-0.0` meet, harmless as `betainc`
is the same at both; object arrays are refused, their bytes are addresses). Values
are frozen (their arrays made read-only) so no caller can change what a later call reads.
`max_bytes` bounds the bytes of the arrays and `bytes` in keys and values together: past
it the least recently used entries go first, and an entry larger than the store is not
kept. One lock per store for its writes. `disabled()` (or `_ENABLED = False`) turns all stores off:
nothing read or kept (the tests compare the two). A kept value is the object the
computation returned: the same bits whether read back or computed.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import numpy as np

_ENABLED = True


def key(*values) -> tuple:
  """A dict key of NumPy values (None stays None): each one's dtype, shape and bytes."""
  return tuple([None if v is None else _bits(np.asarray(v)) for v in values])


def _bits(a: np.ndarray) -> tuple:
  if a.dtype.hasobject:
    raise TypeError(f"cannot key an object array (dtype {a.dtype}): its bytes are addresses")
  return a.dtype.str, a.shape, a.tobytes()


def _freeze(obj) -> int:
  """Bytes of the arrays, NumPy scalars and `bytes` in `obj` (tuples searched); arrays frozen."""
  if isinstance(obj, np.ndarray):
    obj.flags.writeable = False
  if isinstance(obj, (np.ndarray, np.generic)):
    return obj.nbytes
  if isinstance(obj, tuple):
    return sum(_freeze(v) for v in obj)
  return len(obj) if isinstance(obj, bytes) else 0


class Memo:
  """At most `max_bytes` of keys and values, least recently used out first; no None values."""

  def __init__(self, max_bytes: int):
    self.max_bytes, self.nbytes = int(max_bytes), 0
    self._items: OrderedDict = OrderedDict()  # key -> (value, bytes)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._items)

  def clear(self) -> None:
    with self._lock:
      self._items.clear()
      self.nbytes = 0

  def get_many(self, keys) -> list:
    """The values kept under `keys` (None where none is), each now the most recently used.

    Without the lock: each OrderedDict call is atomic under the GIL, and an entry evicted
    by another thread between `get` and `move_to_end` is simply not moved.
    """
    if not _ENABLED:
      return [None] * len(keys)
    items, out = self._items, []
    for k in keys:
      item = items.get(k)
      if item is not None:
        with contextlib.suppress(KeyError):
          items.move_to_end(k)
      out.append(None if item is None else item[0])
    return out

  def put(self, k, value):
    """`value`, frozen and kept under `k` (the least recently used out past `max_bytes`)."""
    size = _freeze(k) + _freeze(value)
    if _ENABLED and size <= self.max_bytes:
      with self._lock:
        old = self._items.pop(k, None)
        self.nbytes += size - (0 if old is None else old[1])
        while self.nbytes > self.max_bytes:
          self.nbytes -= self._items.popitem(last=False)[1][1]
        self._items[k] = (value, size)
    return value

  def lookup(self, k, compute):
    """The value kept under `k`, or `compute()` kept (the same object) and returned."""
    (value,) = self.get_many((k,))
    return self.put(k, compute()) if value is None else value


@contextlib.contextmanager
def disabled():
  """Every store off inside the block (process-wide, not per thread)."""
  global _ENABLED
  before, _ENABLED = _ENABLED, False
  try:
    yield
  finally:
    _ENABLED = before
