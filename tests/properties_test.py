"""Property-based tests (hypothesis) of every attention implementation.

Each implementation is one entry of `IMPLEMENTATIONS`; a new selection or
kernel is covered by appending an entry. The properties, over layouts
(batch dims, grouped-query heads, S = 1), dtypes (float32, bfloat16, float16,
and float64 with x64 enabled inside the test), k, masks (none, random,
causal, fully masked rows, -inf bias) and score magnitudes up to 1e4:

  * outputs are finite; attention weight rows sum to 1, or are all 0 for a
    fully masked row, whose output is exactly 0;
  * with k >= S, every top-k implementation equals dense attention;
  * permuting the keys (with their values, mask and bias columns) does not
    change the output (for top-k only when the k-th and (k+1)-th logits are
    separated, so the selected set is unique);
  * the certificate holds: `tail_mass_bound >= true tail mass` and
    `error_bound >= ||dense - topk||`, both against a NumPy float64 reference;
  * the error identity of `gsparse.sparsity.topk_error_decomposition` holds.

Hypothesis is derandomized (fixed examples, no example database), so CI is
deterministic. Each property runs `Impl.examples` examples per implementation:
`MAX_EXAMPLES` = 20 for dense, top-k "full" and the gather; 6 for the "exact"
selection, 3 for "block" and 2 for "lsh", whose compiles are far slower on CPU
(before trimming for the CI budget, all properties also passed with 8 examples
each for the three selections, and check_grads at k=2 for "block" and "lsh").
That is 11 x 20 + 4 x 6 + 3 x 3 + 2 x 2 = 257 examples (1028 instances: each
example holds `INSTANCES` = 4), plus 30 for the error identity. (All passed
with 30 examples per property for dense, "full" and the gather, 367 in all,
before trimming for the CI time budget.) Sizes come from a
small pool of layouts so that compiled functions are reused across examples.

Each property runs twice: `[fast]` in the default suite with an eighth of
those examples, rounded up (3 for dense, "full" and the XLA gather, 1 for the
others: 46 examples in all, the Pallas kernel's included; a smoke check of every
(property, implementation) pair), and `[full]`, marked `slow`, with all of
them. Every new (layout, dtype, k) combination compiles anew, so the fast run
costs a fraction of the full one; CI runs both (`.ci/run`, second step `-m slow`). The
same split holds for the gradient checks: the first k of each implementation
runs by default, the k >= S case (k = 7, S = 6) only in the slow step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gsparse
from gsparse.selection import BlockSelection, ExactSelection, LSHSelection

MAX_EXAMPLES = 20

SETTINGS = settings(
  max_examples=MAX_EXAMPLES,
  derandomize=True,
  database=None,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
  print_blob=True,
)

# ----------------------------------------------------------------------------
# Implementations under test.


class Result(NamedTuple):
  """What an implementation returns, in a common form.

  Attributes:
    output: `[batch..., T, N, Hv]` in the input dtype.
    weights: rows that must sum to 1 (or be all 0 for a fully masked row),
      `[..., rows, m]`, or None.
    indices: `[batch..., T, N, k]` keys used (-1 = none), or None for dense.
    stats: `gsparse.TopKStats` or None.
  """

  output: jax.Array
  weights: jax.Array | None
  indices: jax.Array | None
  stats: Any


class Impl(NamedTuple):
  """One implementation entry.

  Attributes:
    name: test id.
    fn: `(query, key, value, bias, mask, *, k) -> Result`, jittable with `k` static.
    topk: keeps at most k keys per query (False for dense).
    dense_when_k_ge_s: equals dense attention when k >= S.
    permutation_invariant: the output does not depend on the order of keys
      (given a unique top-k set).
    exact_selection: selects the k largest logits (the certificate and
      permutation checks assume this).
    examples: hypothesis examples per property (compiles dominate the cost).
    grad_ks: the k values of `test_check_grads`.
    dtypes: the input dtypes drawn, None for all of `DTYPES` (the Pallas
      kernels reject float64).
  """

  name: str
  fn: Callable[..., Result]
  topk: bool
  dense_when_k_ge_s: bool = True
  permutation_invariant: bool = True
  exact_selection: bool = True
  examples: int = MAX_EXAMPLES
  grad_ks: tuple[int, ...] = (2, 7)
  dtypes: tuple[str, ...] | None = None


def _dense(q, k, v, bias, mask, *, k_keep):
  del k_keep
  out = gsparse.dot_product_attention(q, k, v, bias, mask)
  w = gsparse.attention_weights(q, k, bias, mask)
  return Result(out, w, None, None)


def _topk(q, k, v, bias, mask, *, k_keep, selection, **kwargs):
  out, stats = gsparse.topk_attention(
    q, k, v, bias, mask, k=k_keep, selection=selection, return_stats=True, **kwargs
  )
  return Result(out, None, stats.indices, stats)


def _topk_block(q, k, v, bias, mask, *, k_keep):
  """Block selection with blocks of 2 keys: 2 kept (approximate) when k <= 4, else all."""
  cfg = BlockSelection(block_size=2, num_blocks=2 if k_keep <= 4 else 8, query_chunk=2)
  return _topk(q, k, v, bias, mask, k_keep=k_keep, selection=cfg)


def _topk_lsh(q, k, v, bias, mask, *, k_keep):
  """sortLSH with a 4-key window (plus the diagonal block), fixed PRNG key."""
  cfg = LSHSelection(num_projections=2, block_size=4)
  return _topk(q, k, v, bias, mask, k_keep=k_keep, selection=cfg, selection_key=jax.random.key(7))


def _gather(q, k, v, bias, mask, *, k_keep, implementation):
  """Sparse gather fed an exact top-k selection with duplicates and -1 slots added.

  The selection comes from `gsparse.topk.select_topk_full`; the index list is
  then doubled ([sel, reversed sel]) so that every kept key appears twice, and
  one slot is replaced with an out-of-range index. Set semantics must make this
  equal to top-k attention over `sel`.
  """
  lg = gsparse.compute_logits(q, k, bias, mask)
  sel = gsparse.topk.select_topk_full(lg.logits, lg.valid, k_keep).indices
  s = k.shape[-3]
  idx = jnp.concatenate([sel, sel[..., ::-1], jnp.full_like(sel[..., :1], s + 3)], axis=-1)
  gb = None
  if bias is not None:
    full = jnp.broadcast_to(bias, lg.logits.shape)  # [..., N, T, S]
    safe = jnp.clip(jnp.swapaxes(idx, -3, -2), 0, s - 1)
    gb = jnp.swapaxes(jnp.take_along_axis(full, safe, axis=-1), -3, -2)
  res = gsparse.sparse_gather_attention(
    q, k, v, idx, bias=gb, return_residuals=True, implementation=implementation
  )
  return Result(res.output, res.weights, sel, None)


IMPLEMENTATIONS: list[Impl] = [
  Impl("dense", _dense, topk=False),
  Impl("topk-full", functools.partial(_topk, selection="full"), topk=True),
  Impl(
    "topk-exact",
    functools.partial(_topk, selection=ExactSelection(query_chunk=2, key_block=2)),
    topk=True,
    examples=6,
    grad_ks=(2,),
  ),
  Impl(
    "topk-block",
    _topk_block,
    topk=True,
    permutation_invariant=False,
    exact_selection=False,
    examples=3,
    grad_ks=(),
  ),
  Impl(
    "topk-lsh",
    _topk_lsh,
    topk=True,
    dense_when_k_ge_s=False,
    permutation_invariant=False,
    exact_selection=False,
    examples=2,
    grad_ks=(),
  ),
  Impl("gather-xla", functools.partial(_gather, implementation=None), topk=True),
  # The Pallas kernel in interpret mode on CPU: few examples, as each compiles slowly.
  Impl(
    "gather-pallas",
    functools.partial(_gather, implementation="pallas"),
    topk=True,
    examples=2,
    grad_ks=(),
    dtypes=("float32", "bfloat16", "float16"),
  ),
]

IMPL_IDS = [impl.name for impl in IMPLEMENTATIONS]


@functools.cache
def _jitted(name: str):
  impl = {i.name: i for i in IMPLEMENTATIONS}[name]
  return jax.jit(impl.fn, static_argnames=("k_keep",))


# ----------------------------------------------------------------------------
# Inputs.

# (batch, T, S, N, K, H): grouped-query heads with an extra batch dim, and a
# single key. The first batch axis holds INSTANCES independent instances, each
# with its own score magnitude and mask kind, so that one compiled function
# checks several of them per example (compilation dominates the run time).
INSTANCES = 4
LAYOUTS = [
  ((INSTANCES, 2), 3, 6, 4, 2, 3),
  ((INSTANCES,), 2, 1, 1, 1, 2),
]
DTYPES = ["float32", "bfloat16", "float16", "float64"]
# "none" is an all-True mask with a zero bias; the mask=None / bias=None code
# paths are covered by tests/stability_test.py and the foundation's tests.
MASKS = ["none", "random", "causal", "empty_rows", "neg_inf_bias"]
MAGNITUDES = [1e-2, 1.0, 30.0, 1e3, 1e4]

# Relative output tolerance of the input dtype (rounding of the output) and
# unit roundoff of the logit arithmetic (float32 unless the inputs are float64).
OUT_RTOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3, "float64": 1e-10}
LOGIT_EPS = {"float32": 1.2e-7, "bfloat16": 1.2e-7, "float16": 1.2e-7, "float64": 2.3e-16}


class Case(NamedTuple):
  q: np.ndarray  # float64 copies of the (quantised) inputs
  k: np.ndarray
  v: np.ndarray
  bias: np.ndarray  # float32 values, may hold -inf
  mask: np.ndarray
  dtype: str
  k_keep: int

  def arrays(self):
    dt = jnp.dtype(self.dtype)
    return (
      jnp.asarray(self.q, dt),
      jnp.asarray(self.k, dt),
      jnp.asarray(self.v, dt),
      jnp.asarray(self.bias, jnp.float32),
      jnp.asarray(self.mask),
    )


def _instance_mask_bias(rng, kind: str, shape: tuple[int, ...]):
  """Mask and bias of one instance, `shape = (*batch, N, T, S)`."""
  t, s = shape[-2:]
  mask = np.ones(shape, bool)
  bias = np.zeros(shape)
  if kind == "random":
    mask = rng.random(shape) < 0.6
    bias = rng.standard_normal(shape)
  elif kind == "causal":
    mask = np.broadcast_to(np.arange(s)[None, :] <= np.arange(t)[:, None], shape).copy()
  elif kind == "empty_rows":
    mask = np.broadcast_to(rng.random((*shape[:-1], 1)) < 0.5, shape).copy()
  elif kind == "neg_inf_bias":
    bias = np.where(rng.random(shape) < 0.4, -np.inf, rng.standard_normal(shape))
    bias[..., 0, :] = -np.inf  # a fully masked row per head, through the bias alone
  return mask, bias


@st.composite
def cases(draw, dtypes=DTYPES, masks=MASKS):
  batch, t, s, n, kh, h = draw(st.sampled_from(LAYOUTS))
  dtype = draw(st.sampled_from(dtypes))
  k_keep = draw(st.sampled_from([1, 3, s + 1]))
  kinds = draw(st.lists(st.sampled_from(masks), min_size=INSTANCES, max_size=INSTANCES))
  mags = draw(st.lists(st.sampled_from(MAGNITUDES), min_size=INSTANCES, max_size=INSTANCES))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  # Logits q.k / sqrt(H) are about N(0, magnitude^2); clip so float16 cannot overflow.
  mag = np.reshape(mags, (INSTANCES,) + (1,) * (len(batch) + 2))
  q = np.clip(rng.standard_normal((*batch, t, n, h)), -3, 3) * mag
  k = np.clip(rng.standard_normal((*batch, s, kh, h)), -3, 3)
  v = rng.standard_normal((*batch, s, kh, h))
  shape = (*batch[1:], n, t, s)
  mb = [_instance_mask_bias(rng, kind, shape) for kind in kinds]
  mask = np.stack([m for m, _ in mb])
  bias = np.stack([b for _, b in mb]).astype(np.float32).astype(np.float64)
  # Quantise to the dtype so the float64 reference sees the same numbers.
  if dtype != "float64":
    q, k, v = (np.asarray(jnp.asarray(x, dtype)).astype(np.float64) for x in (q, k, v))
  return Case(q, k, v, bias, mask, dtype, k_keep)


@contextlib.contextmanager
def dtype_context(dtype: str):
  """Enables x64 for float64 cases (restored on exit)."""
  if dtype == "float64":
    with jax.enable_x64(True):
      yield
  else:
    yield


def run_impl(impl: Impl, case: Case, **overrides) -> Result:
  fields = case._replace(**overrides)
  with dtype_context(case.dtype):
    q, k, v, bias, mask = fields.arrays()
    res = _jitted(impl.name)(q, k, v, bias, mask, k_keep=fields.k_keep)
    res = jax.tree.map(np.asarray, res)
  return jax.tree.map(lambda x: x if x.dtype.kind in "biu" else x.astype(np.float64), res)


# ----------------------------------------------------------------------------
# NumPy float64 reference.


def ref_logits(case: Case) -> tuple[np.ndarray, np.ndarray]:
  """`[batch..., N, T, S]` float64 logits and validity (True = admissible)."""
  q, k = case.q, case.k
  n, kh, h = q.shape[-2], k.shape[-2], q.shape[-1]
  kr = np.repeat(k, n // kh, axis=-2)  # [..., S, N, H]
  logits = np.einsum("...tnh,...snh->...nts", q, kr) / np.sqrt(h)
  logits = logits + np.where(np.isfinite(case.bias), case.bias, 0.0)
  valid = np.isfinite(case.bias) & case.mask
  return np.where(valid, logits, -np.inf), valid


def ref_weights(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
  m = np.max(np.where(valid, logits, -np.inf), axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(valid, np.exp(np.where(valid, logits - m, 0.0)), 0.0)
  z = e.sum(-1, keepdims=True)
  return e / np.where(z > 0, z, 1.0)


def ref_output(case: Case, weights: np.ndarray) -> np.ndarray:
  """`[batch..., T, N, Hv]` from `[batch..., N, T, S]` weights."""
  n, kh = case.q.shape[-2], case.v.shape[-2]
  vr = np.repeat(case.v, n // kh, axis=-2)  # [..., S, N, Hv]
  return np.einsum("...nts,...snv->...tnv", weights, vr)


def kept_mask(indices: np.ndarray, s: int) -> np.ndarray:
  """`[batch..., N, T, S]` boolean from `[batch..., T, N, k]` indices."""
  idx = np.swapaxes(indices, -3, -2)
  onehot = (idx[..., None] == np.arange(s)) & (idx[..., None] >= 0)
  return onehot.any(-2)


def logit_tol(case: Case, logits: np.ndarray, valid: np.ndarray) -> float:
  """Bound on the absolute rounding error of the computed logits.

  The standard dot-product bound `(H + 2) u sum_h |q_h k_h| scale` (+ the bias),
  with u the unit roundoff of the logit arithmetic, maximised over the
  admissible entries.
  """
  q, k = np.abs(case.q), np.abs(case.k)
  n, kh, h = q.shape[-2], k.shape[-2], q.shape[-1]
  absdot = np.einsum("...tnh,...snh->...nts", q, np.repeat(k, n // kh, axis=-2)) / np.sqrt(h)
  absdot = absdot + np.abs(np.where(np.isfinite(case.bias), case.bias, 0.0))
  big = np.max(np.where(valid, absdot, 0.0), initial=0.0)
  return (h + 2) * LOGIT_EPS[case.dtype] * (big + 1.0)


def out_tol(case: Case, logits, valid) -> float:
  vmax = np.max(np.abs(case.v)) + 1e-30
  return vmax * (OUT_RTOL[case.dtype] + 2 * logit_tol(case, logits, valid))


# ----------------------------------------------------------------------------
# Properties.


# The example budgets of every property: an eighth of `Impl.examples` by
# default, all of them in the slow step (module docstring).
BUDGETS = [
  pytest.param(8, id="fast"),
  pytest.param(1, id="full", marks=pytest.mark.slow),
]


def _run(impl: Impl, prop, divisor: int, with_seed: bool = False) -> None:
  """Runs `prop(impl, case[, seed])` on `ceil(impl.examples / divisor)` derandomized examples."""
  run_settings = settings(SETTINGS, max_examples=-(-impl.examples // divisor))
  if with_seed:

    @run_settings
    @given(case=cases(dtypes=impl.dtypes or DTYPES), seed=st.integers(0, 99))
    def run(case, seed):
      prop(impl, case, seed)

  else:

    @run_settings
    @given(case=cases(dtypes=impl.dtypes or DTYPES))
    def run(case):
      prop(impl, case)

  run()


def _finite_and_rows_normalised(impl, case):
  res = run_impl(impl, case)
  logits, valid = ref_logits(case)
  assert np.all(np.isfinite(res.output)), "non-finite output for finite inputs"
  # Fully masked rows (no admissible key) give exactly zero.
  empty = ~valid.any(-1)  # [..., N, T]
  out_nt = np.swapaxes(res.output, -3, -2)  # [..., N, T, Hv]
  assert np.all(out_nt[empty] == 0.0)
  if res.weights is not None:
    w = res.weights
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    sums = w.sum(-1)
    rows_empty = empty if impl.name == "dense" else np.swapaxes(empty, -2, -1)
    np.testing.assert_allclose(sums, np.where(rows_empty, 0.0, 1.0), atol=1e-5)
  if res.stats is not None:
    st_ = res.stats
    assert np.all((st_.tail_mass_bound >= 0) & (st_.tail_mass_bound <= 1))
    assert np.all(np.isfinite(st_.error_bound)) and np.all(st_.error_bound >= 0)
    # The returned log-sum-exp normalises the kept keys: sum exp(s_j - lse) = 1.
    kept = kept_mask(res.indices, case.k.shape[-3]) & valid
    lse = np.swapaxes(st_.logsumexp, -2, -1)
    shifted = np.where(kept, logits - np.where(np.isfinite(lse), lse, 0.0)[..., None], 0.0)
    mass = np.sum(np.where(kept, np.exp(shifted), 0.0), -1)
    np.testing.assert_allclose(
      mass, np.where(empty, 0.0, 1.0), atol=1e-5 + 4 * logit_tol(case, logits, valid)
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IMPL_IDS)
@pytest.mark.parametrize("divisor", BUDGETS)
def test_finite_and_rows_normalised(impl, divisor):
  _run(impl, _finite_and_rows_normalised, divisor)


def _k_at_least_s_equals_dense(impl, case):
  case = case._replace(k_keep=case.k.shape[-3] + 1)
  out = run_impl(impl, case).output
  logits, valid = ref_logits(case)
  expected = ref_output(case, ref_weights(logits, valid))
  np.testing.assert_allclose(out, expected, rtol=0, atol=out_tol(case, logits, valid))
  if impl.topk:
    dense = run_impl(IMPLEMENTATIONS[0], case).output
    np.testing.assert_allclose(out, dense, rtol=0, atol=out_tol(case, logits, valid))


@pytest.mark.parametrize(
  "impl", [i for i in IMPLEMENTATIONS if i.dense_when_k_ge_s], ids=lambda i: i.name
)
@pytest.mark.parametrize("divisor", BUDGETS)
def test_k_at_least_s_equals_dense(impl, divisor):
  _run(impl, _k_at_least_s_equals_dense, divisor)


def _min_topk_gap(k_keep: int, logits, valid) -> float:
  """Smallest gap between the k-th and (k+1)-th admissible logits over the rows.

  Rows with fewer than k+1 admissible keys (or infinite logits there) have no
  boundary and do not count; inf when no row has one.
  """
  if k_keep >= logits.shape[-1]:
    return np.inf
  srt = -np.sort(-np.where(valid, logits, -np.inf), axis=-1)
  a, b = srt[..., k_keep - 1], srt[..., k_keep]
  finite = np.isfinite(a) & np.isfinite(b)
  gap = np.where(finite, a, 1.0) - np.where(finite, b, 0.0)
  return float(np.min(np.where(finite, gap, np.inf), initial=np.inf))


def _unique_topk(case: Case, logits, valid) -> bool:
  """True when the k-th and (k+1)-th admissible logits of every row are separated."""
  return _min_topk_gap(case.k_keep, logits, valid) > 4 * logit_tol(case, logits, valid)


def _key_permutation_invariance(impl, case, seed):
  logits, valid = ref_logits(case)
  if impl.topk:
    assume(_unique_topk(case, logits, valid))
  s = case.k.shape[-3]
  perm = np.random.default_rng(seed).permutation(s)
  permuted = case._replace(
    k=np.take(case.k, perm, axis=-3),
    v=np.take(case.v, perm, axis=-3),
    mask=case.mask[..., perm],
    bias=case.bias[..., perm],
  )
  out = run_impl(impl, case).output
  out_p = run_impl(impl, permuted).output
  np.testing.assert_allclose(out_p, out, rtol=0, atol=2 * out_tol(case, logits, valid))


@pytest.mark.parametrize(
  "impl", [i for i in IMPLEMENTATIONS if i.permutation_invariant], ids=lambda i: i.name
)
@pytest.mark.parametrize("divisor", BUDGETS)
def test_key_permutation_invariance(impl, divisor):
  _run(impl, _key_permutation_invariance, divisor, with_seed=True)


def _certificate_holds(impl, case):
  """The certificate bounds the true tail mass and error of the keys actually kept.

  Valid for every selection, approximate ones included; exact selections must
  moreover keep a top-k set.
  """
  res = run_impl(impl, case)
  logits, valid = ref_logits(case)
  s = logits.shape[-1]
  p = ref_weights(logits, valid)
  kept = kept_mask(res.indices, s) & valid
  true_tail = np.where(kept, 0.0, p).sum(-1)  # [..., N, T]
  dense = ref_output(case, p)
  topk = ref_output(case, ref_weights(logits, kept))
  true_err = np.linalg.norm(dense - topk, axis=-1)  # [..., T, N]
  tol = logit_tol(case, logits, valid)
  if impl.exact_selection:
    # Every dropped admissible key ranks below every kept one (a top-k set), and
    # min(k, #admissible) keys are kept.
    kth = np.where(kept, logits, np.inf).min(-1)
    dropped_max = np.where(valid & ~kept, logits, -np.inf).max(-1)
    assert np.all(dropped_max <= kth + 4 * tol)
    np.testing.assert_array_equal(kept.sum(-1), np.minimum(valid.sum(-1), case.k_keep))
  if res.stats is None:
    return
  bound = np.swapaxes(res.stats.tail_mass_bound, -2, -1)
  # Rounding of the float32 logits perturbs exp(s) by a factor exp(+-tol).
  slack = np.expm1(4 * tol) + 1e-6
  assert np.all(bound * (1 + slack) + 1e-30 >= true_tail), np.max(true_tail - bound)
  vmax = np.max(np.abs(case.v))
  err_slack = OUT_RTOL[case.dtype] * vmax * np.sqrt(case.v.shape[-1]) + slack * vmax
  assert np.all(
    res.stats.error_bound * (1 + slack) + err_slack * bound.swapaxes(-2, -1) >= true_err - 1e-12
  )
  # No dropped mass: the bound must be 0 when every admissible key is kept.
  all_kept = np.all(kept | ~valid, axis=-1)
  if impl.exact_selection:
    assert np.all(bound[all_kept] == 0.0)


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i.topk], ids=lambda i: i.name)
@pytest.mark.parametrize("divisor", BUDGETS)
def test_certificate_holds(impl, divisor):
  _run(impl, _certificate_holds, divisor)


_decomposition = jax.jit(gsparse.sparsity.topk_error_decomposition, static_argnames="k")


@settings(max_examples=30, derandomize=True, database=None, deadline=None, print_blob=True)
@given(
  n=st.sampled_from([1, 7]),
  k=st.sampled_from([1, 3, 7, 9]),
  magnitudes=st.lists(st.sampled_from(MAGNITUDES), min_size=8, max_size=8),
  x64=st.booleans(),
  seed=st.integers(0, 2**32 - 1),
)
def test_error_identity(n, k, magnitudes, x64, seed):
  """`||o - o_k|| = t ||mu_tail - mu_head||` and `o = (1 - t) mu_head + t mu_tail`."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((8, n)) * np.asarray(magnitudes)[:, None]
  p = ref_weights(logits, np.ones_like(logits, bool))
  v = rng.standard_normal((8, n, 3))
  dtype = np.float64 if x64 else np.float32
  with dtype_context("float64" if x64 else "float32"):
    dec = _decomposition(jnp.asarray(p, dtype), jnp.asarray(v, dtype), k=k)
    dec = jax.tree.map(lambda x: np.asarray(x, np.float64), dec)
  tol = (1e-12 if x64 else 1e-5) * np.max(np.abs(v)) * n
  assert np.all((dec.tail_mass >= 0) & (dec.tail_mass <= 1 + tol))
  np.testing.assert_allclose(dec.identity_error, dec.error, rtol=0, atol=tol)
  np.testing.assert_allclose(dec.output, np.einsum("rn,rnd->rd", p, v), rtol=0, atol=tol)
  mixture = (1 - dec.tail_mass)[:, None] * dec.head_mean + dec.tail_mass[:, None] * dec.tail_mean
  np.testing.assert_allclose(mixture, dec.output, rtol=0, atol=tol)
  if k >= n:
    assert np.all(dec.tail_mass == 0) and np.all(dec.error <= tol)


# ----------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize(
  "impl, k_keep",
  [
    # The first k of each implementation by default; k >= S (all keys kept) in the slow step.
    pytest.param(i, kk, id=f"{i.name}-k{kk}", marks=[pytest.mark.slow] if j else [])
    for i in IMPLEMENTATIONS
    for j, kk in enumerate(i.grad_ks)
  ],
)
def test_check_grads(impl, k_keep):
  """First-order gradients (forward and reverse mode) against finite differences.

  float64 (x64 enabled inside the test), grouped-query heads, a random mask with
  one fully masked row, and a bias. The seed is fixed and the k-th/(k+1)-th
  logit gap is asserted to exceed the finite-difference step by far, so the
  top-k set does not change under the perturbation.
  """
  rng = np.random.default_rng(123)
  t, s, n, kh, h = 3, 6, 4, 2, 3
  with jax.enable_x64(True):
    q = jnp.asarray(rng.standard_normal((t, n, h)))
    k = jnp.asarray(rng.standard_normal((s, kh, h)))
    v = jnp.asarray(rng.standard_normal((s, kh, h)))
    bias = jnp.asarray(rng.standard_normal((n, t, s)) * 0.5)
    mask = rng.random((n, t, s)) < 0.8
    mask[1, 2] = False
    mask = jnp.asarray(mask)
    if impl.topk and k_keep < s:
      case = Case(
        np.asarray(q),
        np.asarray(k),
        np.asarray(v),
        np.asarray(bias),
        np.asarray(mask),
        "float64",
        k_keep,
      )
      logits, valid = ref_logits(case)
      assert _min_topk_gap(k_keep, logits, valid) > 1e-2  # a property of seed 123
    f = jax.jit(lambda q, k, v, bias: impl.fn(q, k, v, bias, mask, k_keep=k_keep).output)
    jax.test_util.check_grads(
      f, (q, k, v, bias), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5
    )
