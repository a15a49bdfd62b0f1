"""The NumPy path's memo (`gsparse.bounds._memo`): keys, frozen values, the byte limit, and that
every public bound on Python numbers gives the same bits with the stores on and off."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

import gsparse.bounds as B
from gsparse.bounds import _gcells, _iso_events, _laplace, _memo, _xp


def test_key_holds_dtype_shape_and_bytes():
  k = _memo.key
  assert k(np.float64(0.0)) != k(np.float64(-0.0))
  assert k(np.float64(1.0)) != k(np.float32(1.0))
  assert k(np.zeros(4)) != k(np.zeros((2, 2)))
  assert k(np.arange(3.0), None) == k(np.arange(3.0), None) != k(np.arange(3.0), 0.0)
  assert k(1.5) == k(np.float64(1.5))  # a Python float is its float64


def test_values_are_frozen_and_the_limit_evicts_the_least_recently_used():
  store = _memo.Memo(3 * 2 * 80)  # three entries of an 80-byte key and an 80-byte value
  keys = [_memo.key(np.full(10, float(i))) for i in range(4)]
  calls = []

  def make(i):
    calls.append(i)
    return np.full(10, i, np.float64)

  first = store.lookup(keys[0], lambda: make(0))
  assert not first.flags.writeable
  with pytest.raises(ValueError):
    first[0] = 1.0
  assert store.lookup(keys[0], lambda: make(9)) is first  # read back, not recomputed
  store.lookup(keys[1], lambda: make(1))
  store.lookup(keys[2], lambda: make(2))
  store.get_many([keys[0]])  # 0 now the most recently used: 1 goes first
  store.lookup(keys[3], lambda: make(3))
  assert [v is None for v in store.get_many(keys)] == [False, True, False, False]
  assert store.nbytes == 3 * 160 == store.max_bytes and len(store) == 3
  big = np.zeros(100)
  assert store.put(_memo.key(big), big) is big and len(store) == 3  # larger than the store
  assert not big.flags.writeable
  store.clear()
  assert len(store) == 0 and store.nbytes == 0
  assert calls == [0, 1, 2, 3]


def test_disabled_reads_and_keeps_nothing():
  store = _memo.Memo(1 << 20)
  k = _memo.key(np.arange(3.0))
  kept = store.put(k, np.arange(3.0))
  with _memo.disabled():
    assert store.get_many([k]) == [None]
    fresh = store.lookup(_memo.key(np.ones(2)), lambda: np.ones(2))
    assert fresh is not None and len(store) == 1
  assert store.get_many([k])[0] is kept
  assert _memo._ENABLED


def test_threads_sharing_a_store_keep_its_byte_count():
  store = _memo.Memo(50 * 16)  # 50 entries of an 8-byte key and an 8-byte value
  wrong = []  # an assert inside a thread would not fail the test: collected here

  def work(seed):
    rng = np.random.default_rng(seed)  # one seeded generator per thread
    for v in rng.integers(0, 200, 2000).astype(np.float64):
      got = store.lookup(_memo.key(v), lambda v=v: np.float64(v))
      if got != v:
        wrong.append((v, got))

  threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not wrong, wrong[:5]
  assert len(store) <= 50 and store.nbytes == 16 * len(store)


def test_memo_scalar_keys_the_margin_dtype():
  """A root computed under float32 margins is not served to a float64 evaluation (review)."""
  from gsparse.bounds import _common

  calls = []

  @_xp.memo_scalar
  def margin_of(x):
    calls.append(x)
    return np.float64(_common._safety(np.float64)) * x

  one = np.float64(1.0)
  got = {}
  for dt in (np.float32, np.float64, np.float32):
    token = _common._MARGIN_DTYPE.set(np.dtype(dt))
    try:
      got[np.dtype(dt).name] = margin_of(one)
    finally:
      _common._MARGIN_DTYPE.reset(token)
  assert got == {"float32": 0.5, "float64": 1.0 - 1e-6} and len(calls) == 2


def test_object_arrays_are_not_keyed():
  with pytest.raises(TypeError, match="object array"):
    _memo.key(2**70)


def _norms(w):
  """The norms of the first head of the first layer of `w` ([2, layers, d, heads, dh])."""
  sv = B.norms.interaction_singular_values(w[0].astype(np.float64), w[1].astype(np.float64))
  return B.InteractionNorms(*(float(v[0, 0]) for v in B.norms._norms_from_singular_values(sv)))


def _calls(u, w):
  """Each public bound once at the setting drawn from `u` (6 uniforms) and weights `w`."""
  n = int(2.0 ** (7 + 5 * u[0]))
  sigma, eps, k = 0.3 + 1.5 * u[1], 0.002 + 0.05 * u[2], int(4 + 60 * u[3])
  delta = 10.0 ** (-2 - 4 * u[4])
  norms = _norms(w)
  vnorms = B.InteractionNorms(8.0 * (0.5 + u[5]), 1.5, 4.0)
  out = [
    B.sparsity_bound(n, sigma, norms, eps=eps, delta=delta),
    B.sparsity_eps_bound(n, sigma, norms, k=k, delta=delta),
    B.topk_error_bound(n, sigma, norms, k=k, value_norm=1.0, delta=delta),
    B.isotropic_error_bound(n, sigma, norms, value_norms=vnorms, k=k, delta=delta),
    B.rank_layers_by_sparsity(w[0], w[1], n=n, eps=eps, sigma=sigma, delta=delta),
  ]
  return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(out)]


def test_public_bounds_are_the_same_bits_with_the_memo_on_and_off():
  # 20 random settings (n 128-4096, sigma, eps, k, delta 1e-2..1e-6, value norms; 2-layer,
  # 2-head weights): memo on (twice: computed and kept, then read back) against memo off.
  key = jax.random.key(1818)
  stores = (_xp._ROWS, _gcells._TAILS, _laplace._KEPT, _iso_events._QUAD_HI)
  for store in stores:
    store.clear()
  for i in range(20):
    ku, kw = jax.random.split(jax.random.fold_in(key, i))
    u = np.asarray(jax.random.uniform(ku, (6,)), np.float64)
    w = np.asarray(jax.random.normal(kw, (2, 2, 16, 2, 8)), np.float32) * np.float32(0.2)
    with _memo.disabled():
      plain = _calls(u, w)
    kept, again = _calls(u, w), _calls(u, w)
    for a, b, c in zip(plain, kept, again, strict=True):
      np.testing.assert_array_equal(b, a, err_msg=str(i))
      np.testing.assert_array_equal(c, a, err_msg=str(i))
  assert all(len(store) > 0 for store in stores)  # every store was used (and read back)
