"""The NumPy evaluation of the bounds: no jax operation, and its shortcuts change no bit.

On Python numbers the bounds run in NumPy (`gsparse/bounds/_xp.py`) with three
shortcuts: cells, bounds and per-cell parts evaluated worst-first and only
where a comparison needs them (`_npsearch`), binomial-tail rows kept
(`betainc_rows`) and a memoised root (`memo_scalar`). Here each is checked
against the plain evaluation bit for bit, and the NumPy path against the jax
one under jit (slow: it compiles the bounds).
"""

from __future__ import annotations

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sps
from jax._src import core

import gsparse.bounds as B
from gsparse.bounds import (
  _common,
  _gcells,
  _laplace,
  _logz,
  _npsearch,
  _xp,
  error,
  row,
  sparsity,
  tau,
)

_W = np.random.default_rng(1).standard_normal((2, 2, 8, 2, 4)).astype(np.float32)


def _random_settings(key, count):
  """`count` rows of (n, sigma, eps, k, frob, op, gram, row tau), float64, seeded by `key`."""
  u = np.asarray(jax.random.uniform(key, (count, 7)), np.float64)
  n = np.round(2.0 ** (4 + 8 * u[:, 0]))  # 16 .. 4096
  sigma = 0.5 + u[:, 1]
  eps = 0.005 + 0.1 * u[:, 2]
  k = np.round(1 + 40 * u[:, 3])
  op = 0.5 + 2.0 * u[:, 4]
  frob = op * (1.0 + 3.0 * u[:, 5])  # ||M||_F >= ||M||_op
  gram = np.sqrt(op**2 * frob**2)  # between ||M||_op^2 and ||M||_F^2 (sum of s^4 <= op^2 sum s^2)
  return n, sigma, eps, k, frob, op, gram, 3.0 * u[:, 6]


class _Binds:
  """Counts the jax primitives bound while active; under `disable_jit`, every jax operation."""

  def __init__(self):
    self.seen = collections.Counter()

  def __enter__(self):
    self._orig = core.Primitive.bind
    seen, orig = self.seen, self._orig

    def bind(prim, *args, **params):
      seen[prim.name] += 1
      return orig(prim, *args, **params)

    core.Primitive.bind = bind
    self._nojit = jax.disable_jit()
    self._nojit.__enter__()
    return self

  def __exit__(self, *exc):
    self._nojit.__exit__(*exc)
    core.Primitive.bind = self._orig


def test_python_number_calls_run_no_jax_operation():
  norms = B.InteractionNorms(3.0, 1.2, 2.0)
  jax.block_until_ready(B.rank_layers_by_sparsity(_W[0], _W[1], n=64, eps=0.1))  # stages weights
  with _Binds() as binds:
    jnp.add(1.0, 2.0)  # the counter sees a jax operation, so an empty count below means none ran
    assert binds.seen["add"] >= 1
    binds.seen.clear()
    for i, sigma in enumerate((0.9, 1.1)):
      jax.block_until_ready(
        [
          B.tau_range(512 + i, sigma, norms),
          B.sparsity_bound(64 + i, sigma, norms, eps=0.05 + 0.01 * i),
          B.sparsity_eps_bound(64, sigma, norms, k=4 + i),
          B.topk_error_bound(64, sigma, norms, k=4 + i, value_norm=1.0),
          B.value_norm_bound(64, sigma, norms, delta=1e-3),
          B.row_sparsity_bound(16, 2.0 * sigma, eps=0.1, delta=1e-3),
        ]
      )
    scalar_ops = dict(binds.seen)
    r = B.rank_layers_by_sparsity(_W[0] * np.float32(1.1), _W[1], n=65, eps=0.1, sigma=0.9)
    jax.block_until_ready(r)
  assert scalar_ops == {}, scalar_ops
  # The weights are staged on the device (`stage`, a transfer); nothing is computed there.
  assert set(binds.seen) <= {"stage"}, binds.seen


def test_isotropic_error_bound_on_python_numbers_runs_no_jax_operation():
  norms, vnorms = B.InteractionNorms(3.0, 1.2, 2.0), B.InteractionNorms(8.0, 1.5, 4.0)
  with _Binds() as binds:
    jnp.add(1.0, 2.0)  # the counter sees a jax operation, so an empty count below means none ran
    assert binds.seen["add"] >= 1
    binds.seen.clear()
    for sigma in (0.9, 1.1):
      out = B.isotropic_error_bound(256, sigma, norms, value_norms=vnorms, k=8, delta=1e-3)
      jax.block_until_ready(out)
  assert dict(binds.seen) == {}, binds.seen
  assert 0.0 < float(out.error) < float(2.0 * out.value_norm)  # a real bound came back


def _plain(monkeypatch):
  """Turns the NumPy shortcuts off: every cell and bound evaluated, nothing kept."""
  monkeypatch.setattr(_npsearch, "_BATCH", 10**9)
  monkeypatch.setattr(_npsearch, "_LAZY", False)
  monkeypatch.setattr(
    _xp.NP, "betainc_rows", lambda a, b, x: sps.betainc(a[..., None], b[..., None], x)
  )
  monkeypatch.setattr(tau, "_solve_w_minus_log_w", tau._solve_w_minus_log_w.__wrapped__)
  row_parts = sparsity._row_parts  # Lemma 5's m-parts at each use, not once per fixed m
  monkeypatch.setattr(sparsity, "_row_parts", lambda *a, m=None, **kw: row_parts(*a, **kw))


def test_scalar_root_loop_is_the_broadcast_one_bit_for_bit():
  rng = np.random.default_rng(3)  # one seeded generator: 64 roots per dtype and side
  for dtype in (np.float64, np.float32):
    c = np.concatenate([1.0 + rng.exponential(5.0, 60), [0.5, 1.0, 80.0, 3.0]]).astype(dtype)
    for upper in (True, False):
      batch = tau._solve_w_minus_log_w.__wrapped__(c, upper)  # `[64]`: the broadcast loop
      one = [tau._solve_w_minus_log_w.__wrapped__(x, upper) for x in c]  # 0-d: Python loop
      assert all(np.asarray(o).dtype == dtype for o in one)
      np.testing.assert_array_equal(np.stack(one), batch)


def test_numpy_shortcuts_change_no_bit(monkeypatch):
  n, sigma, eps, k, frob, op, gram, row_tau = _random_settings(jax.random.key(0), 4)
  # One diffuse setting (small sigma, small eps, large n): Theorem-1 k lands past
  # the first scan chunk, so the worst-first search runs more than one step.
  n[-1], sigma[-1], eps[-1] = 4096.0, 0.5, 0.005
  evals = {
    "sparsity": lambda f32: sparsity._SPARSITY.numpy(
      [n, sigma, eps, 1e-4, frob, op, gram], np.float64, margin_dtype=f32
    ),
    "eps": lambda f32: sparsity._EPS.numpy(
      [n, sigma, k, 1e-4, frob, op, gram], np.float64, margin_dtype=f32
    ),
    "row": lambda f32: row._ROW.numpy([n, row_tau, eps, 1e-4], np.float64, margin_dtype=f32),
    "error": lambda f32: error._ERROR.numpy(
      [n, sigma, k, 1e-4, frob, op, gram, 0.0, 0.0, 0.0, 1.0],
      np.float64,
      margin_dtype=f32,
      given=True,
    ),
  }
  fast = {}
  for name, run in evals.items():
    _xp._ROWS.clear()
    fast[name] = run(np.float32)  # float32 margins, as in the default dtype
    warm = run(np.float32)  # the kept rows and roots, read back
    for a, b in zip(fast[name], warm, strict=True):
      np.testing.assert_array_equal(a, b)
  _plain(monkeypatch)
  for name, got in fast.items():
    for a, b in zip(got, evals[name](np.float32), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=name)
  # The settings exercise the searches: Theorem-1 k moved past the first scan chunk somewhere.
  assert np.any(fast["sparsity"][0] > 32), fast["sparsity"][0]


def test_log_phi_diff_per_shape_is_the_broadcast_one_bit_for_bit():
  rng = np.random.default_rng(4)  # one seeded generator: 3 sign patterns x 2 dtypes
  col = rng.uniform(0.1, 3.0, (16, 1))
  row = rng.uniform(0.1, 6.0, (1, 40))
  for dtype in (np.float64, np.float32):
    for a in (col, -col, col * rng.choice([-1.0, 1.0], (16, 1))):  # a > 0 all, none, mixed
      a, b = a.astype(dtype), (row + a).astype(dtype)  # b above a: a real difference
      a_b, b_b = np.broadcast_arrays(a, b)
      sym = a_b > 0  # the jax formula's stacked evaluation, in NumPy
      hi = sps.log_ndtr(np.where(sym, -a_b, b_b))
      lo = sps.log_ndtr(np.where(sym, -b_b, a_b))
      want = np.where(b_b > a_b, hi + _common._log1mexp(lo - hi), -np.inf)
      got = _common._log_phi_diff(b, a)
      assert got.dtype == want.dtype == dtype
      np.testing.assert_array_equal(got, want)


def test_betainc_rows_are_the_broadcast_betainc_and_the_store_stays_bounded(monkeypatch):
  x = np.linspace(0.0, 1.0, 17)
  a = np.array([[1.0, 2.0, 3.0], [1.0, 5.0, 3.0]])
  b = np.array([[10.0], [20.0]])
  want = sps.betainc(a[..., None], b[..., None], x)
  _xp._ROWS.clear()
  np.testing.assert_array_equal(_xp.NP.betainc_rows(a, b, x), want)
  np.testing.assert_array_equal(_xp.NP.betainc_rows(a, b, x), want)  # read back
  assert len(_xp._ROWS) == 6  # one row per distinct (a, b)
  assert _xp._ROWS.nbytes == 6 * 2 * x.nbytes  # each row and its grid key
  monkeypatch.setattr(_xp._ROWS, "max_bytes", 7 * 2 * x.nbytes)
  _xp.NP.betainc_rows(np.arange(4.0) + 10.0, 1.0, x)  # 6 + 4 > 7: the 3 oldest rows out
  assert len(_xp._ROWS) == 7
  assert _xp._ROWS.get_many([(x.tobytes(), 1.0, 10.0), (x.tobytes(), 2.0, 10.0)])[0] is None
  assert _xp._ROWS.get_many([(x.tobytes(), 13.0, 1.0)])[0] is not None


def test_log_transform_reference_from_the_extreme_node_is_the_full_reduction_bit_for_bit():
  rng = np.random.default_rng(5)  # one seeded generator: 16 tau cells, 12 levels, 24 lambdas
  t = np.sort(rng.uniform(0.05, 6.0, 16))
  c = np.sort(rng.uniform(-3.0, 4.0, 12))
  theta = np.linspace(-3.0, 9.0, 24)
  lams = (theta - 4.6, theta + rng.uniform(-5.0, 1.0, (16, 1, 1)))  # [K], and [C, 1, K] per cell
  for weights in (_laplace._top_weights(t, c), _laplace._rest_weights(t, c)):
    x, p, floor = weights  # the rest's first column is -inf: e^x = 0 there
    for sign, log_lam in itertools.product((1.0, -1.0), lams):
      e = np.exp(x)[..., None] * np.exp(log_lam)  # the reduction over every node, as jax does
      e = np.minimum(e, 1e30) if sign < 0 else e
      ref = np.max(e, axis=1) if sign > 0 else np.min(e, axis=1)
      v = np.exp(sign * (e - ref[:, None, :])).reshape(p.shape[0], -1, *e.shape[1:])
      s = np.matmul(p[:, None], v).reshape(-1, p.shape[1], e.shape[-1])
      want = np.log(s + floor[None, :, None]) + (sign * ref)[:, None, :]
      np.testing.assert_array_equal(_laplace._log_transform(weights, log_lam, sign), want)


@pytest.mark.slow  # one jit of four bounds: 45 s to 2.5 min on the shared 2-core machine
def test_numpy_path_matches_the_jitted_jax_path():
  n, sigma, eps, k, frob, op, gram, row_tau = _random_settings(jax.random.key(2), 8)
  norms = B.InteractionNorms(frob, op, gram)
  f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]

  @jax.jit
  def traced(n, sigma, eps, k, frob, op, gram, row_tau):
    nm = B.InteractionNorms(frob, op, gram)
    return (
      B.sparsity_bound(n, sigma, nm, eps=eps),
      B.sparsity_eps_bound(n, sigma, nm, k=k),
      B.row_sparsity_bound(n, row_tau, eps=eps, delta=1e-4),
      B.tau_range(n, sigma, nm),
    )

  got = traced(*f32(n, sigma, eps, k, frob, op, gram, row_tau))
  eager = (  # NumPy arrays: the NumPy path
    B.sparsity_bound(n, sigma, norms, eps=eps),
    B.sparsity_eps_bound(n, sigma, norms, k=k),
    B.row_sparsity_bound(n, row_tau, eps=eps, delta=1e-4),
    B.tau_range(n, sigma, norms),
  )
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(eager), strict=True):
    g, e = np.asarray(g), np.asarray(e)
    if g.dtype == bool or np.all(np.round(e) == e):  # integer outputs: identical
      np.testing.assert_array_equal(g, e)
    else:  # float32 XLA against float64 NumPy rounded to float32
      np.testing.assert_allclose(g, e, rtol=2e-5)


def test_per_cell_parts_come_in_aligned_groups_and_lazy_minimum_decides_as_the_full_one():
  asked = []

  def compute(idx):
    asked.append(idx.tolist())
    return (idx[:, None] * np.arange(3.0),)

  parts = _npsearch.PerCell(8, compute, group=4)
  np.testing.assert_array_equal(parts.get(np.array([5]))[0], [[0.0, 5.0, 10.0]])
  np.testing.assert_array_equal(parts.get(np.array([6, 1]))[0][:, 1], [6.0, 1.0])
  np.testing.assert_array_equal(parts.get()[0][:, 2], 2.0 * np.arange(8))
  assert asked == [[4, 5, 6, 7], [0, 1, 2, 3]]  # each aligned group once, on first use

  rng = np.random.default_rng(0)  # one seeded generator: values around the level 0.5
  first, second, third = rng.uniform(0.0, 1.0, (3, 2, 16))
  seen = []

  def bound(vals):
    def f(cols):
      seen.append(cols.size)
      return vals[..., cols]

    return f

  full = np.minimum(np.minimum(first, second), third)
  lazy = _npsearch.min_bounds(first, [bound(second), bound(third)], 0.5)
  np.testing.assert_array_equal(lazy > 0.5, full > 0.5)  # every comparison, and the values above
  np.testing.assert_array_equal(lazy[full > 0.5], full[full > 0.5])
  assert seen[0] < 16 and seen[1] <= seen[0]  # later bounds only where still above the level
  seen.clear()
  one = _npsearch.min_bounds(first[0], [bound(second[0]), bound(third[0])], 0.5)
  assert (np.max(one) > 0.5) == (np.max(full[0]) > 0.5)


def test_a_nan_bound_is_never_admissible_in_the_m_scan():
  # A cell bound that is NaN for m < 40 (one cell of 16 in the NumPy path, every cell in
  # the jax one) must not certify those m; the old scans took m = 1 (NaN > level is False).
  def np_fail(m, cells=None):
    m = np.asarray(m, np.float64)[..., None]
    vals = np.where((m < 40.0) & (np.arange(16) == 11), np.nan, 0.0) + 0.0 * m
    return vals if cells is None else vals[..., cells]

  got = _gcells._first_admissible_m(np.float64(1000.0), np_fail, np.float64(0.1), 0, count=16)
  assert got == 40.0

  def jax_fail(m, cells=None):
    return jnp.where(m < 40.0, jnp.nan, 0.0)[..., None]

  scan = jax.jit(lambda n, level: _gcells._first_admissible_m(n, jax_fail, level, 0))
  assert float(scan(jnp.float32(1000.0), jnp.float32(0.1))) == 40.0
  # The trivial k where every m is NaN.
  assert float(scan(jnp.float32(30.0), jnp.float32(0.1))) == 30.0


def test_g_cell_probabilities_outside_0_1_count_as_1():
  # jax's float32 betainc returns -inf / inf / NaN at n = 1e8, m = 200 (seen on this jax);
  # such a value says nothing, so the G-cell sum must use 1 there.
  p = np.asarray([-np.inf, -0.5, np.nan, np.inf, 2.0, 0.25, 0.0])
  np.testing.assert_array_equal(_gcells._prob_up(p), [1.0, 1.0, 1.0, 1.0, 1.0, 0.25, 0.0])
  np.testing.assert_array_equal(np.asarray(_gcells._prob_up(jnp.asarray(p))), _gcells._prob_up(p))


def test_ladder_band_masses_kept_between_calls_are_the_computed_ones_bit_for_bit():
  # Theorem 1's Lemma 6 rounds each band's reference scale to 2^(j/8) and keeps the band's
  # masses (NumPy); a kept band must be exactly what a fresh evaluation of all bands gives.
  rng = np.random.default_rng(7)
  c = row._g_grid(np.float64(1023.0), 64, np.float64)[1:]
  for lo in (0.3, 1.7):
    t = np.sort(lo * np.exp(rng.uniform(0.0, 1.2, 32)))
    ref = _laplace._band_scales(t, ladder=True)
    raw = _laplace._band_scales(t)
    assert np.all(np.abs(np.log2(ref / raw)) <= 1 / 16 + 1e-12)  # within half a ladder step
    np.testing.assert_allclose(np.log2(ref) * 8, np.round(np.log2(ref) * 8), atol=1e-9)
    jref = np.asarray(_laplace._band_scales(jnp.asarray(t, jnp.float32), ladder=True))
    np.testing.assert_allclose(jref, ref, rtol=1e-6)  # the jax path picks the same rungs
    for weights in (_laplace._top_weights, _laplace._rest_weights):
      _laplace._KEPT.clear()
      first = weights(t[8:24], c, ladder=True)  # two bands computed and kept
      full = weights(t, c, ladder=True)  # two read back, two computed
      mass_fn = _laplace._top_mass if weights is _laplace._top_weights else _laplace._rest_mass
      _laplace._KEPT.clear()
      d = (
        _laplace._top_offsets(ref)
        if mass_fn is _laplace._top_mass
        else _laplace._rest_offsets(ref, np.maximum(np.max(c) - _laplace._FLOOR, 1.0))
      )
      np.testing.assert_array_equal(full[1], mass_fn(d, c))
      np.testing.assert_array_equal(first[1], full[1][1:3])
      np.testing.assert_array_equal(full[0], weights(t, c, ladder=True)[0])


def test_chernoff_fail_with_the_lambdas_on_the_middle_axis_is_the_same_bit_for_bit():
  # The NumPy search keeps Lemma 6's parts as [C, K, L] (a faster minimum over K).
  nm1 = np.float64(1023.0)
  c = row._g_grid(nm1, 64, np.float64)
  ta = np.linspace(0.5, 3.0, 16)
  lam_a, top, rest = row._chernoff_parts(np.float64(0.01), ta, ta * 1.02, c, num_lambda=16)
  flip = tuple(np.ascontiguousarray(v.transpose(0, 2, 1)) for v in (top, rest))
  for m, cells in ((np.arange(1.0, 33.0), np.asarray([5])), (np.float64(40.0), None)):
    want = row._chernoff_fail(nm1, m, np.float64(0.01), c, (lam_a, top, rest), cells)
    got = row._chernoff_fail(nm1, m, np.float64(0.01), c, (lam_a, *flip), cells, k_axis=-2)
    np.testing.assert_array_equal(got, want)


def test_g_cell_tails_kept_between_calls_are_the_computed_ones_bit_for_bit(monkeypatch):
  # `_sum_over_g_cells` keeps its binomial tails per (n, m, grid) on the NumPy path; a kept
  # entry must be exactly what a fresh evaluation gives, and must not be writable.
  nm1 = np.float64(511.0)
  c = row._g_grid(nm1, 64, np.float64)
  b = np.asarray(jax.random.uniform(jax.random.key(18), (32, 3, 64)), np.float64)
  m = np.arange(1.0, 33.0)[:, None]
  _gcells._TAILS.clear()
  for head in (None, np.maximum(nm1, m)):
    fresh = _gcells._g_tails(nm1, m, c, head, _common._safety(c.dtype))
    first = _gcells._sum_over_g_cells(nm1, m, c, b, head_nm1=head)  # computed and kept
    kept = _gcells._np_g_tails(nm1, m, c, head, _common._safety(c.dtype))
    for got, want in zip(kept, fresh, strict=True):
      np.testing.assert_array_equal(got, want)
      assert not got.flags.writeable
    np.testing.assert_array_equal(_gcells._sum_over_g_cells(nm1, m, c, b, head_nm1=head), first)
  assert len(_gcells._TAILS) == 2
  monkeypatch.setattr(_gcells._TAILS, "max_bytes", _gcells._TAILS.nbytes)
  _gcells._sum_over_g_cells(nm1, m[:4], c, b[:4])  # over the limit: the oldest entry out
  assert len(_gcells._TAILS) == 2
  assert _gcells._TAILS.nbytes <= _gcells._TAILS.max_bytes


def test_each_heads_ranking_k_is_its_own_scalar_sparsity_bound():
  # The ranking evaluates its heads one after the other with the kept parts (band masses,
  # binomial rows, G-cell tails) warm; each head's k must be that of a scalar call from
  # cold stores. 3 random rankings (2-6 heads each, n 64-2048).
  key = jax.random.key(1806)
  for i in range(3):
    kw, ks = jax.random.split(jax.random.fold_in(key, i))
    layers, heads = 1 + i, 2
    w = np.asarray(jax.random.normal(kw, (2, layers, 16, heads, 8)), np.float32)
    u = np.asarray(jax.random.uniform(ks, (3,)), np.float64)
    w = w * np.float32(0.1 + 0.3 * u[0])
    n, eps = int(2.0 ** (6 + 5 * u[1])), float(0.003 + 0.05 * u[2])
    ranking = B.rank_layers_by_sparsity(w[0], w[1], n=n, eps=eps, delta=1e-3)
    dt = np.float32
    q, k = (x.astype(dt).astype(np.float64) for x in (w[0], w[1]))
    norms = B.InteractionNorms(
      *B.norms._norms_from_singular_values(B.norms.interaction_singular_values(q, k))
    )
    for lh in itertools.product(range(layers), range(heads)):
      for store in (_gcells._TAILS, _xp._ROWS, _laplace._KEPT):
        store.clear()
      head = B.InteractionNorms(*(float(v[lh]) for v in norms))
      want = B.sparsity_bound(n, 1.0, head, eps=eps, delta=1e-3).k
      assert float(ranking.k[lh]) == float(want), (i, lh)


def test_stacked_log_z_lower_of_several_points_is_each_points_own_bit_for_bit(monkeypatch):
  # On several points the NumPy path computes `_log_z_lower` (and, for Theorem 1, Lemma 5's
  # moments of the scan's first witness cell) once per (n, delta) for all their cells
  # stacked; every output must be that of a one-point call. 8 random points over two n and
  # two delta (4 groups), both Theorem 1 and its inverse.
  n, sigma, eps, k, frob, op, gram, _ = _random_settings(jax.random.key(1807), 8)
  n = np.where(np.arange(8) % 2 == 0, 300.0, 1500.0)
  delta = np.where(np.arange(8) < 4, 1e-4, 1e-2)
  sizes, moments = [], []
  lz, om = _logz._log_z_lower, sparsity._orderstat_moments
  monkeypatch.setattr(_logz, "_log_z_lower", lambda *a: sizes.append(a[1].size) or lz(*a))
  monkeypatch.setattr(
    sparsity, "_orderstat_moments", lambda *a: moments.append(a[0].size) or om(*a)
  )
  for fn, kw in ((B.sparsity_bound, {"eps": eps}), (B.sparsity_eps_bound, {"k": k})):
    sizes.clear()
    moments.clear()
    many = fn(n, sigma, B.InteractionNorms(frob, op, gram), delta=delta, **kw)
    assert sizes == [2 * _common._NUM_CELLS] * 4, sizes  # one stacked call per group
    if fn is B.sparsity_bound:
      assert moments[:4] == [2] * 4, moments  # the two witness cells of each group
    for i in range(8):
      one = fn(
        n[i],
        sigma[i],
        B.InteractionNorms(frob[i], op[i], gram[i]),
        delta=delta[i],
        **{key: v[i] for key, v in kw.items()},
      )
      for got, want in zip(many, one, strict=True):
        np.testing.assert_array_equal(np.asarray(got)[i], np.asarray(want))


def test_per_cell_store_keeps_a_copy_of_what_it_is_given():
  # `PerCell.put` with every cell at once kept the caller's arrays themselves, so a later
  # in-place change by the caller would have changed the kept parts (review of the caches).
  cells = _npsearch.PerCell(4, lambda idx: (np.zeros(len(idx)),))
  given = np.arange(4.0)
  cells.put(np.arange(4), (given,))
  given[:] = -1.0
  np.testing.assert_array_equal(cells.get()[0], np.arange(4.0))
