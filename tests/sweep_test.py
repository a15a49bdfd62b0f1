"""Tests of gsparse.sweep: the vmapped sweep against a direct computation, and the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse import sweep

# Tests share these static shapes (and chunk_size=1) so that the jitted sweep
# compiles only a few times in the whole file.
_N, _D, _TRIALS, _ROWS = 32, 4, 2, 20


def _direct(x, w, *, k, eps, rows):
  """Per-row measures of one draw, computed with the public per-matrix functions."""
  q, kk, v = gsparse.gaussian.project(x, w)
  p = gsparse.attention_weights(q, kk)[0][:rows]  # [rows, n], one head
  v0 = v[:, 0, :]
  dec = gsparse.sparsity.topk_error_decomposition(p, v0, k=k)
  out, stats = gsparse.topk_attention(q, kk, v, k=k, return_stats=True)
  # The sweep's certificate is the single gap (top-(k+1) logits only); the
  # stats' bound is the smaller band-count one on this exact route.
  sel = gsparse.topk.select_keys(q, kk, v, k=k)
  cert_tail = gsparse.topk.selection_tail_bound(sel, stats.logsumexp)
  cert_error = gsparse.certificate.output_error_certificate(cert_tail, out, v)
  m = gsparse.gaussian.interaction_matrix(w.w_q, w.w_k)[0]
  return {
    "tau": np.asarray(jnp.linalg.norm(x[:rows] @ m, axis=-1)),
    "min_k": np.asarray(gsparse.sparsity.min_sparse_k(p, eps=eps)),
    "support": np.asarray(gsparse.sparsity.effective_support(p)),
    "tail": np.asarray(gsparse.sparsity.tail_mass(p, k=k)),
    "error": np.asarray(dec.error),
    "cert_tail": np.asarray(cert_tail[:rows, 0]),
    "cert_error": np.asarray(cert_error[:rows, 0]),
    "v_norm": np.full(rows, float(jnp.max(jnp.linalg.norm(v0, axis=-1)))),
  }


# (True, False) shares every line with these but the draws' source. With
# crn, k <= n / 4 takes the head from gathered value rows, larger k the matmul.
@pytest.mark.parametrize(
  "resample_weights, crn, ks",
  [(False, False, (2, 3)), (True, True, (2, 3)), (False, True, (3, 12))],
)
def test_sweep_matches_direct_computation(resample_weights, crn, ks):
  """Every column against the public per-matrix functions on the same draws; with
  common random numbers (crn) the draws are the group's, rescaled per point."""
  key = jax.random.key(7)
  n, d, trials, rows = _N, _D, _TRIALS, _ROWS
  # Two points that share (n, d) but differ in every traced parameter.
  pts = {
    "n": [n, n],
    "d": [d, d],
    "sigma": [0.8, 1.7],
    "weight_scale": [0.4, 0.4],
    "k": list(ks),
    "eps": [0.05, 0.02],
  }
  table = sweep.run_sweep(
    pts,
    key=key,
    trials=trials,
    rows=rows,
    resample_weights=resample_weights,
    common_random_numbers=crn,
    chunk_size=1,
    progress=False,
  )
  assert len(table) == 2
  for i, row in enumerate(table.rows()):
    x, w = sweep.point_inputs(
      key,
      i,
      n=n,
      d=d,
      sigma=row["sigma"],
      weight_scale=0.4,
      trials=trials,
      resample_weights=resample_weights,
      common_random_numbers=crn,
    )
    per = [
      _direct(
        x[t],
        jax.tree.map(lambda a, t=t: a[t], w) if resample_weights else w,
        k=row["k"],
        eps=row["eps"],
        rows=rows,
      )
      for t in range(trials)
    ]
    per = {q: np.concatenate([p[q] for p in per]) for q in per[0]}
    per["tau"] = per["tau"] * row["sigma"]
    np.testing.assert_allclose(row["tau_mean"], per["tau"].mean(), rtol=1e-4)
    np.testing.assert_allclose(row["tau_max"], per["tau"].max(), rtol=1e-4)
    assert row["min_k_mean"] == pytest.approx(per["min_k"].mean(), rel=1e-6)
    assert row["min_k_max"] == per["min_k"].max()
    assert row["min_k_q50"] == pytest.approx(np.quantile(per["min_k"], 0.5))
    assert row["min_k_q99"] == pytest.approx(np.quantile(per["min_k"], 0.99), rel=1e-5)
    np.testing.assert_allclose(row["support_mean"], per["support"].mean(), rtol=1e-4)
    np.testing.assert_allclose(row["support_min"], per["support"].min(), rtol=1e-4)
    np.testing.assert_allclose(row["tail_mean"], per["tail"].mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["tail_max"], per["tail"].max(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["error_mean"], per["error"].mean(), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(row["error_max"], per["error"].max(), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(row["cert_tail_max"], per["cert_tail"].max(), rtol=1e-4)
    np.testing.assert_allclose(row["cert_error_max"], per["cert_error"].max(), rtol=1e-3)
    np.testing.assert_allclose(row["v_norm_max"], per["v_norm"].max(), rtol=1e-4)
    # The certificate bounds what it certifies (deterministic, fact 4).
    assert row["cert_tail_max"] >= row["tail_max"] * (1 - 1e-5)
    assert row["cert_error_mean"] >= row["error_mean"] * (1 - 1e-4)
    if not resample_weights:
      m = np.asarray(gsparse.gaussian.interaction_matrix(w.w_q, w.w_k)[0], np.float64)
      np.testing.assert_allclose(row["m_fro"], np.linalg.norm(m), rtol=1e-4)
      np.testing.assert_allclose(row["m_op"], np.linalg.norm(m, 2), rtol=1e-4)
      np.testing.assert_allclose(row["mmt_fro"], np.linalg.norm(m @ m.T), rtol=1e-4)
      np.testing.assert_allclose(row["m_trace"], np.trace(m), rtol=1e-3, atol=1e-5)


def test_numbers_do_not_depend_on_chunking_or_grouping():
  key = jax.random.key(3)
  pts = sweep.grid(n=[_N], d=[_D], sigma=[1.0, 2.0], k=[2, 3], eps=[0.05])
  a = sweep.run_sweep(pts, key=key, trials=_TRIALS, rows=_ROWS, chunk_size=1, progress=False)
  b = sweep.run_sweep(pts, key=key, trials=_TRIALS, rows=_ROWS, chunk_size=4, progress=False)
  for c in sweep.measured_columns():
    np.testing.assert_allclose(a[c], b[c], rtol=1e-5, err_msg=c)
  # A point's numbers depend on its index and parameters only: a sub-sweep of
  # the same point at the same index agrees.
  one = {p: v[:1] for p, v in pts.items()}
  c1 = sweep.run_sweep(one, key=key, trials=_TRIALS, rows=_ROWS, progress=False)
  np.testing.assert_allclose(c1["tail_mean"], a["tail_mean"][:1], rtol=1e-5)


def test_common_random_numbers_share_draws_within_a_group():
  """With common random numbers, equal parameters give equal numbers at any
  position and chunking, the draws are shared only within an (n, d) group, and
  the mode is deterministic given the key."""
  key = jax.random.key(5)
  pts = sweep.grid(n=[_N, 2 * _N], d=[_D], sigma=[1.0, 2.0], k=[2, 3], eps=[0.05])
  pts = {p: np.concatenate([v, v[:1]]) for p, v in pts.items()}  # point 0 repeated last
  kw = dict(key=key, trials=_TRIALS, rows=_ROWS, common_random_numbers=True, progress=False)
  a = sweep.run_sweep(pts, chunk_size=1, **kw)
  b = sweep.run_sweep(pts, chunk_size=3, **kw)
  for c in sweep.measured_columns():
    np.testing.assert_allclose(a[c], b[c], rtol=1e-5, err_msg=c)
    np.testing.assert_allclose(a[c][-1], a[c][0], rtol=1e-6, err_msg=c)
  # Same (n, d), other k: same tau (the draws are shared); other n: other draws.
  same_nd_other_k = (pts["n"] == pts["n"][0]) & (pts["sigma"] == pts["sigma"][0])
  assert np.ptp(a["tau_mean"][same_nd_other_k]) < 1e-6 * a["tau_mean"][0]
  indep = sweep.run_sweep(pts, key=key, trials=_TRIALS, rows=_ROWS, progress=False)
  assert indep["tau_mean"][-1] != indep["tau_mean"][0]  # independent draws per point


def test_csv_round_trip(tmp_path):
  pts = sweep.random_points(0, 5, n=[_N], d=[_D], sigma=(0.5, 2.0), k=[2, 3], eps=(0.01, 0.2))
  assert set(pts["k"].tolist()) <= {2, 3} and np.all(pts["eps"] < 0.2)
  table = sweep.run_sweep(
    pts, key=jax.random.key(1), trials=_TRIALS, rows=_ROWS, chunk_size=1, progress=False
  )
  path = tmp_path / "t.csv"
  table.to_csv(path)
  back = sweep.SweepTable.from_csv(path)
  assert back.names == table.names
  for c in table.names:
    assert back[c].dtype.kind == table[c].dtype.kind, c
    np.testing.assert_array_equal(back[c], table[c], err_msg=c)  # repr() keeps every bit
  lines = path.read_text().splitlines()
  assert lines[0].split(",")[:6] == ["n", "d", "sigma", "weight_scale", "k", "eps"]
  assert len(lines) == 6


def test_table_helpers():
  t = sweep.SweepTable({"a": np.array([3, 1, 2]), "b": np.array([0.5, 0.1, 0.2])})
  assert t.sort_by("a")["b"].tolist() == [0.1, 0.2, 0.5]
  assert t.where(t["a"] > 1)["a"].tolist() == [3, 2]
  assert t.rows()[1] == {"a": 1, "b": 0.1}
  with pytest.raises(KeyError, match="'c'"):
    t["c"]
  with pytest.raises(ValueError, match="equal lengths"):
    sweep.SweepTable({"a": np.zeros(2), "b": np.zeros(3)})


def test_grid_is_the_cartesian_product():
  pts = sweep.grid(n=[8, 16], d=4, sigma=[1.0, 2.0, 3.0], k=2, eps=0.1)
  assert len(pts["n"]) == 6
  assert set(zip(pts["n"].tolist(), pts["sigma"].tolist(), strict=True)) == {
    (n, s) for n in (8, 16) for s in (1.0, 2.0, 3.0)
  }
  np.testing.assert_allclose(pts["weight_scale"], 0.5)  # default 1/sqrt(d)


@pytest.mark.parametrize(
  "change, match",
  [
    ({"k": [0]}, r"points\['k'\]\[0\]=0 must be in \[1, n=8\]"),
    ({"k": [9]}, r"must be in \[1, n=8\]"),
    ({"eps": [1.0]}, r"points\['eps'\]\[0\]=1.0 must be in the open interval"),
    ({"sigma": [-1.0]}, r"points\['sigma'\]\[0\]=-1.0 must be > 0"),
    ({"n": [0]}, r"points\['n'\]\[0\]=0 must be >= 1"),
    ({"sigma": [np.nan]}, r"points\['sigma'\] must be finite"),
  ],
)
def test_bad_points_raise(change, match):
  pts = {"n": [8], "d": [4], "sigma": [1.0], "weight_scale": [0.5], "k": [2], "eps": [0.1]}
  pts.update(change)
  with pytest.raises(ValueError, match=match):
    sweep.run_sweep(pts, key=jax.random.key(0), trials=1, progress=False)


def test_bad_arguments_raise():
  pts = sweep.grid(n=8, d=4, sigma=1.0, k=2, eps=0.1)
  with pytest.raises(TypeError, match="trials must be an int"):
    sweep.run_sweep(pts, key=jax.random.key(0), trials=1.5, progress=False)
  with pytest.raises(ValueError, match="missing the parameter columns"):
    sweep.run_sweep({"n": [8]}, key=jax.random.key(0), trials=1, progress=False)
  with pytest.raises(TypeError, match=r"points\['k'\] must be integers"):
    sweep.check_points({**pts, "k": [2.5]})
  with pytest.raises(ValueError, match="mesh='all'"):
    sweep.run_sweep(pts, key=jax.random.key(0), trials=1, mesh="all", progress=False)


def test_progress_callback_sees_every_point():
  seen = []
  pts = sweep.grid(n=_N, d=_D, sigma=[1.0, 2.0, 3.0, 4.0], k=3, eps=0.1)
  sweep.run_sweep(
    pts,
    key=jax.random.key(0),
    trials=_TRIALS,
    rows=_ROWS,
    chunk_size=1,
    progress=lambda done, total: seen.append((done, total)),
  )
  assert seen[-1] == (4, 4) and len(seen) == 4


def test_k_equal_n_keeps_everything_and_k_is_traced():
  # k = n drops nothing: tail, error and certificate are exactly 0. k is a
  # traced parameter (selection by bisection), so these share one compile.
  pts = sweep.grid(n=_N, d=_D, sigma=[1.5], k=[_N, _N - 1, 1], eps=0.05)
  t = sweep.run_sweep(
    pts, key=jax.random.key(5), trials=_TRIALS, rows=_ROWS, chunk_size=1, progress=False
  )
  assert t["tail_max"][0] == 0 and t["error_max"][0] == 0 and t["cert_tail_max"][0] == 0
  assert np.all(t["tail_max"][1:] > 0)
  assert np.all(t["cert_tail_mean"][1:] >= t["tail_mean"][1:] * (1 - 1e-5))
  assert t["tail_mean"][2] > t["tail_mean"][1]  # fewer keys kept, more mass dropped
