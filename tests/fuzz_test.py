"""Differential fuzzing of top-k attention against the float64 NumPy reference.

Hypothesis draws shapes (empty ones included), dtypes, masks, biases with
+-inf (and rarely NaN), NaN or Inf in the data, negative and extreme scales
(logits up to about 1e4), causal masks with T != S, every selection and
every implementation; each example runs one jitted program (forward and,
for finite data, backward) and is checked by `np_reference.check_topk_route`
and `np_reference.topk_grads`, which use no gsparse code.

Profiles: the default ("ci") is derandomized (a fixed sequence of examples)
with 12 examples, about 60 s on 2 busy cores; `GSPARSE_FUZZ_PROFILE=long`
runs 400 random examples for local runs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gsparse
from gsparse.selection import BlockSelection, LSHSelection
from tests import np_reference as ref

settings.register_profile(
  "ci",
  max_examples=12,
  derandomize=True,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow],
  print_blob=True,
)
settings.register_profile(
  "long",
  max_examples=400,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow],
  print_blob=True,
)
PROFILE = os.environ.get("GSPARSE_FUZZ_PROFILE", "ci")

SELECTIONS = {
  "full": "full",
  "exact": "exact",
  "block": BlockSelection(block_size=2, num_blocks=2),
  "lsh": LSHSelection(block_size=2),
}
DTYPES = {"float32": (jnp.float32, 6e-8), "bfloat16": (jnp.bfloat16, 4e-3)}
# Shapes (batch, T, S, N, K, H, Hv): a few, so that compiled programs are reused.
SHAPES = [
  ((), 4, 6, 2, 1, 3, 2),
  ((2,), 5, 3, 1, 1, 2, 3),
  ((), 3, 5, 2, 2, 4, 0),
  ((), 0, 4, 1, 1, 2, 2),
  ((0,), 3, 4, 1, 1, 2, 2),
]


@st.composite
def cases(draw):
  batch, t, s, n, kh, h, hv = draw(st.sampled_from(SHAPES))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  dtype_name = draw(st.sampled_from(sorted(DTYPES)))
  q = rng.standard_normal((*batch, t, n, h))
  k = rng.standard_normal((*batch, s, kh, h))
  v = rng.standard_normal((*batch, s, kh, hv))
  special = draw(st.sampled_from(["none", "none", "nan_q", "nan_k", "nan_v", "inf_q", "inf_k"]))
  arr, val = {
    "nan_q": (q, np.nan),
    "nan_k": (k, np.nan),
    "nan_v": (v, np.nan),
    "inf_q": (q, np.inf),
    "inf_k": (k, -np.inf),
  }.get(special, (None, None))
  if arr is not None and arr.size:
    arr.flat[rng.integers(arr.size)] = val
  bias = None
  if draw(st.booleans()):
    bias = rng.standard_normal((*batch, n, t, s)) * draw(st.sampled_from([0.1, 3.0]))
    bias[rng.random(bias.shape) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = -np.inf
    if draw(st.integers(0, 5)) == 0 and bias.size:
      bias.flat[rng.integers(bias.size)] = draw(st.sampled_from([np.inf, np.nan]))
  mask = rng.random((t, s)) < 0.7 if draw(st.booleans()) else None
  scale = draw(st.sampled_from([None, -0.8, 0.3, -40.0, 2000.0]))
  is_causal = draw(st.booleans())
  topk = draw(st.integers(1, s + 1))
  selection = draw(st.sampled_from(sorted(SELECTIONS)))
  if selection in ("block", "lsh"):
    topk = min(topk, 4)  # their candidate capacity here: k above it is a documented error
  implementation = draw(st.sampled_from(["xla", "masked", "pallas"]))
  dtype, u = DTYPES[dtype_name]
  cast = lambda x: None if x is None else np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  return dict(
    q=cast(q),
    k=cast(k),
    v=cast(v),
    bias=cast(bias),
    mask=mask,
    scale=scale,
    is_causal=is_causal,
    topk=topk,
    selection=selection,
    implementation=implementation,
    dtype=dtype,
    u=u,
    special=special,
  )


def _program(c):
  sel = SELECTIONS[c["selection"]]

  def f(q, k, v, bias):
    return gsparse.topk_attention(
      q,
      k,
      v,
      bias,
      c["mask"],
      k=c["topk"],
      scale=c["scale"],
      is_causal=c["is_causal"],
      selection=sel,
      selection_key=jax.random.key(0),
      implementation=c["implementation"],
      return_stats=True,
    )

  def program(q, k, v, bias, cot):
    def loss(q, k, v):
      out, stats = f(q, k, v, bias)
      return jnp.sum(cot * out.astype(jnp.float32)), (out, stats)

    (_, fwd), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return fwd, grads

  return jax.jit(program)


@pytest.mark.slow
@settings(settings.get_profile(PROFILE))
@given(cases())
def test_topk_attention_matches_reference(c):
  dt = c["dtype"]
  q, k, v = (jnp.asarray(c[n], dt) for n in ("q", "k", "v"))
  bias = None if c["bias"] is None else jnp.asarray(c["bias"], dt)
  cot = np.random.default_rng(0).standard_normal(q.shape[:-1] + v.shape[-1:]).astype(np.float32)
  (out, stats), grads = _program(c)(q, k, v, bias, cot)
  h = c["q"].shape[-1]
  scale = 1.0 / np.sqrt(h) if c["scale"] is None else c["scale"]
  kw = dict(scale=scale, bias=c["bias"], mask=c["mask"], is_causal=c["is_causal"])
  # Logit rounding: (H + 2) u_f32 sum_h |q_h k_h| |scale| (docs/errors.md), plus the bias.
  qk = np.einsum(
    "...tnh,...snh->...nts",
    np.abs(c["q"]),
    np.repeat(np.abs(c["k"]), c["q"].shape[-2] // c["k"].shape[-2], axis=-2),
  )
  mag = float(np.nanmax(np.where(np.isfinite(qk), qk, 0.0), initial=0.0)) * abs(scale)
  logit_tol = (h + 2) * 6e-8 * (mag + 10.0) * 4
  out_tol = 4 * logit_tol + 2 * c["u"] + 1e-6
  kept, r = ref.check_topk_route(
    out,
    stats,
    c["q"],
    c["k"],
    c["v"],
    topk=c["topk"],
    exact=c["selection"] in ("full", "exact"),
    logit_tol=logit_tol,
    out_tol=out_tol,
    **kw,
  )
  finite_data = c["special"] == "none" and (c["bias"] is None or not np.isnan(c["bias"]).any())
  if not finite_data or (c["bias"] is not None and np.isposinf(c["bias"]).any()):
    return  # gradients of NaN rows are NaN; the table test checks zero grads of masked rows
  want = ref.topk_grads(c["q"], c["k"], c["v"], cot, kept=kept, **kw)
  for got, exp in zip(grads, want, strict=True):
    got = np.asarray(got, np.float64)
    big = max(1.0, float(np.max(np.abs(exp), initial=0.0)))
    np.testing.assert_allclose(got, exp, rtol=0, atol=(1e-4 + 50 * out_tol) * big)
