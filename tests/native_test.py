"""The native CPU top-k (gsparse._native) against jax.lax.top_k, bit for bit."""

import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse import _native
from gsparse._numerics import positive_nan, top_k
from gsparse.selection import ExactSelection

needs_kernel = pytest.mark.skipif(
  _native._compiler() is None or _native.disabled(),
  reason="no C++ compiler here, or GSPARSE_NATIVE=0: fallback only",
)


@needs_kernel
def test_kernel_builds_and_is_used():
  assert _native.available(), _native.unavailable_reason()
  hlo = jax.jit(lambda x: top_k(x, 3)).lower(jnp.zeros((4, 40))).as_text()
  assert "gsparse_topk_f32" in hlo
  # On one device the row partitioning (gsparse._rowwise) is inlined away:
  # the program is the kernel call alone.
  assert jax.device_count() > 1 or "CustomSPMDPartitioning" not in hlo


def _rows(kind, shape, rng):
  if kind == "normal":
    return rng.normal(size=shape)
  if kind == "ties":  # integers in [-3, 3]: most entries tie with many others
    return rng.integers(-3, 4, size=shape)
  if kind == "constant":
    return np.full(shape, 0.5)
  if kind == "ascending":  # worst case of the running filter: every entry beats it
    return np.broadcast_to(np.arange(shape[-1]), shape).copy()
  if kind == "descending":
    return np.broadcast_to(-np.arange(shape[-1]), shape).copy()
  if kind == "special":  # NaN of both signs, infinities, signed zeros among ties
    x = rng.integers(-2, 3, size=shape).astype(np.float32)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    hit = rng.random(shape) < 0.3
    x[hit] = rng.choice(specials, size=int(hit.sum()))
    return x
  raise ValueError(kind)


def _same(x, k):
  got_v, got_i = jax.jit(top_k, static_argnums=1)(x, k)
  # gsparse ranks every NaN first whatever its sign bit (docs/errors.md), where
  # lax.top_k ranks a negative NaN last: the reference sees the sign-cleared input.
  want_v, want_i = jax.lax.top_k(positive_nan(jnp.asarray(x)), k)
  np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
  # Bit patterns, so that NaN payloads and the sign of zero count too.
  bits = lambda a: np.asarray(a.astype(jnp.float32)).view(np.int32)  # noqa: E731
  np.testing.assert_array_equal(bits(got_v), bits(want_v))
  assert got_v.dtype == want_v.dtype


def test_negative_nan_ranks_first():
  """Arithmetic NaNs carry the sign bit; gsparse's top-k ranks them first anyway."""
  x = jnp.array([[1.0, -jnp.nan, 3.0, -jnp.inf]], jnp.float32)
  assert np.signbit(np.asarray(x)[0, 1])  # the input really holds a negative NaN
  vals, idx = jax.jit(top_k, static_argnums=1)(x, 2)
  np.testing.assert_array_equal(np.asarray(idx), [[1, 2]])
  assert np.isnan(np.asarray(vals)[0, 0])


KINDS = ["normal", "ties", "constant", "ascending", "descending", "special"]


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
  "shape,k",
  [
    ((5, 37), 1),  # short rows: the running filter
    ((3, 4, 100), 17),
    ((7, 300), 300),  # k = n: a full sort
    ((6, 4096), 3),  # n >= 128 k: the group-maximum route
    ((6, 4101), 5),  # ... with a tail that is not a whole group
    ((9, 2000), 65),  # filter route with cuts of the buffer
    ((1, 1), 1),
  ],
)
def test_matches_lax_top_k(kind, shape, k):
  rng = np.random.default_rng(zlib.crc32(repr((kind, shape, k)).encode()))
  _same(jnp.asarray(_rows(kind, shape, rng), jnp.float32), k)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_floats_match(dtype):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 3000)) * 4, dtype)  # rounding makes many ties
  for k in (1, 33, 3000):
    _same(x, k)


@needs_kernel
def test_jit_vmap_grad_match_lax_top_k():
  x = jax.random.normal(jax.random.key(0), (3, 5, 700))
  f = lambda x: top_k(x, 20)  # noqa: E731
  g = lambda x: jax.lax.top_k(x, 20)  # noqa: E731
  for a, b in zip(jax.vmap(jax.vmap(f))(x), jax.vmap(jax.vmap(g))(x), strict=True):
    np.testing.assert_array_equal(a, b)
  loss = lambda tk: lambda x: jnp.sum(jnp.sin(tk(x)[0]))  # noqa: E731
  np.testing.assert_array_equal(jax.grad(loss(f))(x), jax.grad(loss(g))(x))
  np.testing.assert_array_equal(jax.jit(jax.grad(loss(f)))(x), jax.grad(loss(g))(x))
  t = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_array_equal(
    jax.jvp(lambda x: f(x)[0], (x,), (t,))[1], jax.jvp(lambda x: g(x)[0], (x,), (t,))[1]
  )


@needs_kernel
def test_float64_and_integers_fall_back(x64):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 50)))
  assert x.dtype == jnp.float64
  assert "gsparse_topk" not in jax.jit(lambda x: top_k(x, 3)).lower(x).as_text()
  _same(x, 3)
  xi = jnp.arange(40, dtype=jnp.int32).reshape(2, 20) % 7
  np.testing.assert_array_equal(top_k(xi, 4)[1], jax.lax.top_k(xi, 4)[1])


@needs_kernel
def test_exact_selection_uses_the_kernel_and_agrees_with_block_search():
  q, k, v = (jax.random.normal(s, (1, 700, 2, 16)) for s in jax.random.split(jax.random.key(3), 3))
  auto = ExactSelection(query_chunk=128)
  blocks = ExactSelection(query_chunk=128, key_block=8)
  run = lambda cfg: jax.jit(  # noqa: E731
    lambda q, k, v: gsparse.topk_attention(
      q, k, v, k=16, selection=cfg, is_causal=True, return_stats=True
    )
  )
  assert "gsparse_topk_f32" in run(auto).lower(q, k, v).as_text()
  (out_a, stats_a), (out_b, stats_b) = run(auto)(q, k, v), run(blocks)(q, k, v)
  # The same keys, exactly. The outputs come from two compiled programs: on
  # jax 0.6-0.10.0 XLA rounds them differently in the last bit (bitwise equal
  # on jax 0.10.2).
  np.testing.assert_array_equal(stats_a.indices, stats_b.indices)
  np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-6)


def _env():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")


def test_disabled_kernel_falls_back_to_lax_top_k():
  """With GSPARSE_NATIVE=0 (or no compiler) results are lax.top_k's, through XLA's TopK."""
  code = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from gsparse import _native
    from gsparse._numerics import top_k
    x = jnp.asarray(np.random.default_rng(0).integers(-3, 4, size=(6, 500)), jnp.float32)
    assert not _native.available()
    assert "GSPARSE_NATIVE" in _native.unavailable_reason()
    hlo = jax.jit(lambda x: top_k(x, 9)).lower(x).as_text()
    assert "gsparse_topk" not in hlo
    for a, b in zip(top_k(x, 9), jax.lax.top_k(x, 9)):
      np.testing.assert_array_equal(a, b)
    print("ok")
    """
  )
  env = dict(_env(), GSPARSE_NATIVE="0")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_broken_compiler_is_reported_not_raised(tmp_path):
  """A compiler that fails leaves the kernel unavailable, with the reason."""
  code = textwrap.dedent(
    """
    from gsparse import _native
    assert not _native.available()
    print(_native.unavailable_reason())
    """
  )
  env = dict(_env(), CXX="false", GSPARSE_CACHE_DIR=str(tmp_path))
  env.pop("GSPARSE_NATIVE", None)
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "failed" in res.stdout


@needs_kernel
def test_kernel_inside_shard_map():
  """Under shard_map (manual axes) the kernel still runs, its indices typed like its input.

  The old code failed here with a TypeError: the custom call's result carried
  no varying manual axes, the XLA branch's did. A 1-device mesh suffices for
  the types; tests/multidevice_checks.py checks 4 devices.
  """
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b"))
  x = jax.random.normal(jax.random.key(4), (2, 3, 300))
  f = jax.shard_map(lambda x: top_k(x, 7), mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b"))
  assert "gsparse_topk_f32" in jax.jit(f).lower(x).as_text()
  for a, b in zip(jax.jit(f)(x), jax.lax.top_k(x, 7), strict=True):
    np.testing.assert_array_equal(a, b)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x)[0])))(x)
  np.testing.assert_array_equal(g, jax.grad(lambda x: jnp.sum(jnp.sin(jax.lax.top_k(x, 7)[0])))(x))
