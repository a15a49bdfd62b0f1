"""Every documented argument check raises as documented, eagerly and under jit.

`ROWS` is the source of truth; docs/errors.md holds the same table, and
`test_docs_table_matches` fails when the two differ, so the docs cannot drift.
Each row's call passes arrays as positional arguments (traced under `jax.jit`)
and Python hyperparameters through the closure (static under `jax.jit`).
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "errors.md"


class Row(NamedTuple):
  function: str  # public name in gsparse
  argument: str
  bad_input: str  # what the caller passed, as shown in the docs
  error: type[Exception]
  message: str  # a substring of the message
  args: tuple[Any, ...]  # arrays, traced under jit
  kwargs: dict[str, Any]  # everything else, static under jit
  x64: bool = False  # call with float64 enabled (NumPy float64 args stay float64)


q = jnp.ones((3, 2, 4))
kv = jnp.ones((5, 1, 4))
kv2 = jnp.ones((5, 2, 4))
idx = jnp.zeros((3, 2, 2), jnp.int32)
p = jnp.full((2, 4), 0.25)
pv = jnp.ones((2, 4, 3))
x = jnp.ones((5, 6))
key = jax.random.key(0)
w = gsparse.gaussian.Weights(jnp.ones((6, 2, 3)), jnp.ones((6, 2, 3)), jnp.ones((6, 2, 3)))
w_bad_d = gsparse.gaussian.Weights(jnp.ones((4, 2, 3)), jnp.ones((4, 2, 3)), jnp.ones((4, 2, 3)))
i32 = jnp.ones((3, 2, 4), jnp.int32)

# Functions taking (query, key, value, ...) share the attention input checks.
QKV_ROWS = [
  ("query", "integer dtype", TypeError, "query must have a floating dtype", (i32, kv, kv), {}),
  (
    "query",
    "fewer than 3 dims",
    ValueError,
    "query must have at least 3 dimensions",
    (q[0], kv, kv),
    {},
  ),
  (
    "key",
    "rank differs from query",
    ValueError,
    "must have the same rank",
    (q, kv[None], kv[None]),
    {},
  ),
  (
    "key",
    "batch dims differ",
    ValueError,
    "must have the same batch dimensions",
    (q[None], jnp.ones((2, 5, 1, 4)), jnp.ones((2, 5, 1, 4))),
    {},
  ),
  (
    "value",
    "sequence length differs from key",
    ValueError,
    "key and value must have the same sequence length",
    (q, kv, kv[:4]),
    {},
  ),
  (
    "value",
    "heads differ from key",
    ValueError,
    "key and value must have the same number of heads",
    (q, kv, kv2),
    {},
  ),
  (
    "key",
    "head_dim differs from query",
    ValueError,
    "query and key must have the same head_dim",
    (q, kv[..., :3], kv),
    {},
  ),
  (
    "key",
    "query heads not a multiple",
    ValueError,
    "must be a multiple of key/value heads",
    (jnp.ones((3, 3, 4)), kv2, kv2),
    {},
  ),
  (
    "key",
    "no positions (S = 0)",
    ValueError,
    "key must have at least one position",
    (q, kv[:0], kv[:0]),
    {},
  ),
  (
    "mask",
    "not boolean",
    TypeError,
    "mask must be boolean",
    (q, kv, kv, None, jnp.ones((2, 3, 5))),
    {},
  ),
  (
    "mask",
    "does not broadcast to [..., N, T, S]",
    ValueError,
    "mask with shape (4,) does not broadcast",
    (q, kv, kv, None, jnp.ones(4, bool)),
    {},
  ),
  (
    "bias",
    "integer dtype",
    TypeError,
    "bias must have a floating dtype",
    (q, kv, kv, jnp.ones((2, 3, 5), jnp.int32)),
    {},
  ),
  (
    "bias",
    "does not broadcast to [..., N, T, S]",
    ValueError,
    "bias with shape (3, 2) does not broadcast",
    (q, kv, kv, jnp.ones((3, 2))),
    {},
  ),
  (
    "scale",
    "`scale=float('nan')`",
    ValueError,
    "scale=nan must be finite",
    (q, kv, kv),
    {"scale": float("nan")},
  ),
  ("scale", "`scale='a'`", TypeError, "scale must be a real number", (q, kv, kv), {"scale": "a"}),
  (
    "scale",
    "an array (shape (2,))",
    ValueError,
    "scale must be a scalar, got an array of shape (2,)",
    (q, kv, kv),
    {"scale": np.array([1.0, 2.0])},
  ),
  (
    "query",
    "a Python list",
    TypeError,
    "query must be an array (jax.Array or numpy.ndarray), got list",
    ([[[1.0] * 4] * 2] * 3, kv, kv),
    {},
  ),
  (
    "query",
    "head_dim 0",
    ValueError,
    "query and key must have head_dim >= 1",
    (q[..., :0], kv[..., :0], kv),
    {},
  ),
  (
    "is_causal",
    "`is_causal=1`",
    TypeError,
    "is_causal must be a bool",
    (q, kv, kv),
    {"is_causal": 1},
  ),
]


def _qk_only(rows):
  """compute_logits / attention_weights take (query, key, bias, mask): drop value."""
  out = []
  for arg, bad, err, msg, args, kwargs in rows:
    if arg == "value":
      continue
    out.append((arg, bad, err, msg, (args[0], args[1], *args[3:]), kwargs))
  return out


ROWS: list[Row] = []
for fn_name, extra, rows in [
  ("dot_product_attention", {}, QKV_ROWS),
  ("topk_attention", {"k": 2}, QKV_ROWS),
  ("compute_logits", {}, _qk_only(QKV_ROWS)),
  ("attention_weights", {}, _qk_only(QKV_ROWS)),
]:
  for arg, bad, err, msg, args, kwargs in rows:
    ROWS.append(Row(fn_name, arg, bad, err, msg, args, {**extra, **kwargs}))

ROWS += [
  Row("topk_attention", "k", "`k=0`", ValueError, "k=0 must be >= 1", (q, kv, kv), {"k": 0}),
  Row("topk_attention", "k", "`k=2.0`", TypeError, "k must be an int", (q, kv, kv), {"k": 2.0}),
  Row("topk_attention", "k", "`k=True`", TypeError, "k must be an int", (q, kv, kv), {"k": True}),
  Row(
    "topk_attention",
    "selection",
    "unknown name",
    ValueError,
    "selection='nope' must be one of",
    (q, kv, kv),
    {"k": 2, "selection": "nope"},
  ),
  Row(
    "topk_attention",
    "selection_key",
    "`selection_key=0`",
    TypeError,
    "selection_key must be a PRNG key",
    (q, kv, kv),
    {"k": 2, "selection": "lsh", "selection_key": 0},
  ),
  Row(
    "topk_attention",
    "selection_key",
    'missing for "lsh"',
    ValueError,
    "selection 'lsh' needs a PRNG key",
    (q, kv, kv),
    {"k": 2, "selection": "lsh"},
  ),
  Row(
    "sparse_gather_attention",
    "scale",
    "an array (shape (2,))",
    ValueError,
    "scale must be a scalar",
    (q, kv, kv, idx),
    {"scale": np.array([1.0, 2.0])},
  ),
  Row(
    "block_sparse_gather_attention",
    "implementation",
    '`"masked"` (token level only)',
    ValueError,
    'implementation="masked" is token level only',
    (q, kv, kv, jnp.zeros((1, 2, 1), jnp.int32)),
    {"block_q": 4, "block_k": 4, "implementation": "masked"},
  ),
  Row(
    "topk_attention",
    "return_stats",
    "`return_stats=1`",
    TypeError,
    "return_stats must be a bool",
    (q, kv, kv),
    {"k": 2, "return_stats": 1},
  ),
  Row(
    "topk_attention",
    "return_residual",
    "with `return_stats=True`",
    ValueError,
    "return_stats and return_residual are exclusive",
    (q, kv, kv),
    {"k": 2, "return_stats": True, "return_residual": True},
  ),
  *[
    Row("topk_attention", arg, bad, err, msg, (q, kv, kv), {"k": 2, arg: val})
    for arg, bad, err, msg, val in [
      (
        "query_seq_lengths",
        "a known value above T",
        ValueError,
        "query_seq_lengths must lie in [0, 3]",
        np.array([4]),
      ),
      (
        "key_value_seq_lengths",
        "a known value below 0",
        ValueError,
        "key_value_seq_lengths must lie in [0, 5]",
        np.array([-1]),
      ),
      (
        "key_value_seq_lengths",
        "floating dtype",
        ValueError,
        "key_value_seq_lengths must have an integer dtype",
        np.array([2.0]),
      ),
      (
        "query_seq_lengths",
        "not the batch shape",
        ValueError,
        "query_seq_lengths must have the batch shape",
        np.array([1, 2]),
      ),
      ("local_window_size", "`local_window_size=-1`", ValueError, "must be >= 0", -1),
      (
        "local_window_size",
        "`local_window_size=1.5`",
        TypeError,
        "local_window_size must be an int or a pair",
        1.5,
      ),
      (
        "segment_ids",
        "shape not [batch..., T]",
        ValueError,
        "segment_ids (q) must have shape",
        (np.zeros(4, np.int32), np.zeros(5, np.int32)),
      ),
      (
        "segment_ids",
        "floating dtype",
        ValueError,
        "segment_ids (kv) must have an integer dtype",
        (np.zeros(3, np.int32), np.zeros(5)),
      ),
      (
        "segment_ids",
        "one array with T != S",
        ValueError,
        "segment_ids as one array needs T == S",
        np.zeros(3, np.int32),
      ),
    ]
  ],
  Row(
    "sparse_gather_attention",
    "query",
    "integer dtype",
    TypeError,
    "query must have a floating dtype",
    (i32, kv, kv, idx),
    {},
  ),
  Row(
    "sparse_gather_attention",
    "key",
    "query heads not a multiple",
    ValueError,
    "must be a multiple of key/value heads",
    (jnp.ones((3, 3, 4)), kv2, kv2, jnp.zeros((3, 3, 2), jnp.int32)),
    {},
  ),
  Row(
    "sparse_gather_attention",
    "indices",
    "floating dtype",
    TypeError,
    "indices must have an integer dtype",
    (q, kv, kv, idx.astype(jnp.float32)),
    {},
  ),
  Row(
    "sparse_gather_attention",
    "indices",
    "shape not [..., T, N, k]",
    ValueError,
    "indices must have shape [batch..., T, N, k]",
    (q, kv, kv, idx[0]),
    {},
  ),
  Row(
    "sparse_gather_attention",
    "indices",
    "k = 0 slots",
    ValueError,
    "indices must select at least one key",
    (q, kv, kv, idx[..., :0]),
    {},
  ),
  Row(
    "sparse_gather_attention",
    "bias",
    "shape differs from indices",
    ValueError,
    "bias must have the shape of indices",
    (q, kv, kv, idx),
    {"bias": jnp.ones((3, 2, 5))},
  ),
  Row(
    "sparse_gather_attention",
    "scale",
    "`scale=float('inf')`",
    ValueError,
    "scale=inf must be finite",
    (q, kv, kv, idx),
    {"scale": float("inf")},
  ),
  Row(
    "sparse_gather_attention",
    "implementation",
    "unknown name",
    ValueError,
    "implementation='cuda' must be",
    (q, kv, kv, idx),
    {"implementation": "cuda"},
  ),
  Row(
    "sparse_gather_attention",
    "implementation",
    '`"pallas"` with float64 inputs',
    TypeError,
    'implementation="pallas" cannot take query of dtype float64',
    (np.ones((3, 2, 4)), np.ones((5, 1, 4)), np.ones((5, 1, 4)), idx),
    {"implementation": "pallas"},
    x64=True,
  ),
  Row(
    "min_sparse_k",
    "p",
    "integer dtype",
    TypeError,
    "p must have a floating dtype",
    (jnp.ones((2, 4), jnp.int32),),
    {"eps": 0.1},
  ),
  Row(
    "min_sparse_k",
    "p",
    "a scalar",
    ValueError,
    "p must have at least 1 dimensions",
    (jnp.float32(1.0),),
    {"eps": 0.1},
  ),
  Row(
    "min_sparse_k",
    "eps",
    "`eps=1.0`",
    ValueError,
    "eps=1.0 must be in (0, 1)",
    (p,),
    {"eps": 1.0},
  ),
  Row(
    "min_sparse_k", "eps", "`eps=None`", TypeError, "eps must be a real number", (p,), {"eps": None}
  ),
  Row(
    "is_sparse",
    "eps",
    "`eps=0.0`",
    ValueError,
    "eps=0.0 must be in (0, 1)",
    (p,),
    {"eps": 0.0, "k": 1},
  ),
  Row("is_sparse", "k", "`k=-1`", ValueError, "k=-1 must be >= 0", (p,), {"eps": 0.1, "k": -1}),
  Row("is_sparse", "k", "`k=2.5`", TypeError, "k must be an int", (p,), {"eps": 0.1, "k": 2.5}),
  Row(
    "is_sparse",
    "k",
    "floating array",
    TypeError,
    "k must be an int or an integer array",
    (p,),
    {"eps": 0.1, "k": jnp.ones(2)},
  ),
  Row("topk_mask", "k", "`k=0`", ValueError, "k=0 must be >= 1", (p,), {"k": 0}),
  Row(
    "topk_mask",
    "p",
    "integer dtype",
    TypeError,
    "p must have a floating dtype",
    (jnp.ones((2, 4), jnp.int32),),
    {"k": 1},
  ),
  Row("tail_mass", "k", "`k=1.5`", TypeError, "k must be an int", (p,), {"k": 1.5}),
  Row("tail_mass", "k", "`k=0`", ValueError, "k=0 must be >= 1", (p,), {"k": 0}),
  Row(
    "tail_mass",
    "p",
    "a scalar",
    ValueError,
    "p must have at least 1 dimensions",
    (jnp.float32(1.0),),
    {"k": 1},
  ),
  Row(
    "effective_support",
    "p",
    "integer dtype",
    TypeError,
    "p must have a floating dtype",
    (jnp.ones((2, 4), jnp.int32),),
    {},
  ),
  Row(
    "topk_error_decomposition",
    "v",
    "n differs from p",
    ValueError,
    "v must have shape [..., n, d] with n=4",
    (p, pv[:, :3]),
    {"k": 1},
  ),
  Row(
    "topk_error_decomposition",
    "v",
    "fewer than 2 dims",
    ValueError,
    "v must have at least 2 dimensions",
    (p, jnp.ones(4)),
    {"k": 1},
  ),
  Row("topk_error_decomposition", "k", "`k=0`", ValueError, "k=0 must be >= 1", (p, pv), {"k": 0}),
  Row(
    "tail_mass_certificate",
    "all",
    "shapes that do not broadcast",
    TypeError,
    "incompatible shapes for broadcasting",
    (jnp.zeros(3), jnp.zeros(4), jnp.ones(3), jnp.ones(3)),
    {},
  ),
  Row(
    "output_error_certificate",
    "value",
    "head_dim differs from topk_output",
    ValueError,
    "output_error_certificate needs tail_bound",
    (jnp.zeros((3, 2)), q, kv[..., :3]),
    {},
  ),
  Row(
    "output_error_certificate",
    "tail_bound",
    "shape not [..., T, N]",
    ValueError,
    "output_error_certificate needs tail_bound",
    (jnp.zeros((3,)), q, kv),
    {},
  ),
  Row(
    "output_error_certificate",
    "topk_output",
    "integer dtype",
    TypeError,
    "topk_output must have a floating dtype",
    (jnp.zeros((3, 2)), i32, kv),
    {},
  ),
  Row(
    "value_center_and_radius",
    "value",
    "fewer than 3 dims",
    ValueError,
    "value must have at least 3 dimensions",
    (jnp.ones((5, 4)),),
    {},
  ),
  Row(
    "value_center_and_radius",
    "value",
    "integer dtype",
    TypeError,
    "value must have a floating dtype",
    (jnp.ones((5, 1, 4), jnp.int32),),
    {},
  ),
  Row("sample_inputs", "n", "`n=0`", ValueError, "n=0 must be >= 1", (key,), {"n": 0, "d": 2}),
  Row("sample_inputs", "d", "`d=2.0`", TypeError, "d must be an int", (key,), {"n": 3, "d": 2.0}),
  Row(
    "sample_inputs",
    "sigma",
    "`sigma=0.0`",
    ValueError,
    "sigma=0.0 must be > 0",
    (key,),
    {"n": 3, "d": 2, "sigma": 0.0},
  ),
  Row(
    "sample_inputs",
    "sigma",
    "`sigma=-1.0`",
    ValueError,
    "sigma=-1.0 must be > 0",
    (key,),
    {"n": 3, "d": 2, "sigma": -1.0},
  ),
  Row(
    "sample_inputs",
    "batch_shape",
    "`batch_shape=(2, 0)`",
    ValueError,
    "batch_shape entry=0 must be >= 1",
    (key,),
    {"n": 3, "d": 2, "batch_shape": (2, 0)},
  ),
  Row(
    "sample_inputs",
    "dtype",
    "`dtype=jnp.int32`",
    TypeError,
    "dtype must be floating",
    (key,),
    {"n": 3, "d": 2, "dtype": jnp.int32},
  ),
  Row(
    "sample_weights",
    "head_dim",
    "`head_dim=0`",
    ValueError,
    "head_dim=0 must be >= 1",
    (key,),
    {"d": 3, "head_dim": 0},
  ),
  Row(
    "sample_weights",
    "heads",
    "`heads=0`",
    ValueError,
    "heads=0 must be >= 1",
    (key,),
    {"d": 3, "head_dim": 2, "heads": 0},
  ),
  Row(
    "sample_weights",
    "value_dim",
    "`value_dim=0`",
    ValueError,
    "value_dim=0 must be >= 1",
    (key,),
    {"d": 3, "head_dim": 2, "value_dim": 0},
  ),
  Row(
    "sample_weights",
    "weight_scale",
    "`weight_scale=0.0`",
    ValueError,
    "weight_scale=0.0 must be > 0",
    (key,),
    {"d": 3, "head_dim": 2, "weight_scale": 0.0},
  ),
  Row(
    "project",
    "x",
    "fewer than 2 dims",
    ValueError,
    "x must have at least 2 dimensions",
    (jnp.ones(6), w),
    {},
  ),
  Row(
    "project",
    "weights",
    "d differs from x",
    ValueError,
    "weights.w_q.shape[0]=4 must equal d=6",
    (x, w_bad_d),
    {},
  ),
  Row(
    "project",
    "weights",
    "w_q, w_k shapes differ",
    ValueError,
    "must match",
    (x, w._replace(w_k=jnp.ones((6, 2, 4)))),
    {},
  ),
  Row(
    "project",
    "weights",
    "w_v heads differ",
    ValueError,
    "weights.w_v has 1 heads",
    (x, w._replace(w_v=jnp.ones((6, 1, 3)))),
    {},
  ),
  Row(
    "interaction_matrix",
    "w_k",
    "shape differs from w_q",
    ValueError,
    "must both be [d, heads, h] or [d, h]",
    (w.w_q, jnp.ones((6, 2, 2))),
    {},
  ),
  Row(
    "interaction_matrix",
    "scale",
    "`scale=float('inf')`",
    ValueError,
    "scale=inf must be finite",
    (w.w_q, w.w_k),
    {"scale": float("inf")},
  ),
  Row(
    "gaussian_attention",
    "weights",
    "d differs from x",
    ValueError,
    "must equal d=6",
    (x, w_bad_d),
    {},
  ),
  Row(
    "gaussian_attention",
    "mask",
    "not boolean",
    TypeError,
    "mask must be boolean",
    (x, w),
    {"mask": jnp.ones((5, 5))},
  ),
  Row(
    "gaussian_attention_weights",
    "x",
    "integer dtype",
    TypeError,
    "x must have a floating dtype",
    (jnp.ones((5, 6), jnp.int32), w),
    {},
  ),
  Row(
    "gaussian_attention_weights",
    "is_causal",
    "`is_causal=None`",
    TypeError,
    "is_causal must be a bool",
    (x, w),
    {"is_causal": None},
  ),
  Row("checked", "fn", "not callable", TypeError, "is not a callable object", (), {"fn": 3}),
]

# The bounds take Python scalars through the closure: a traced scalar is accepted unchecked.
norms = gsparse.bounds.InteractionNorms(1.0, 1.0, 1.0)
bq = jnp.ones((3, 2, 4))  # T=3, N=2; block_q=2 gives 2 query blocks
bidx = jnp.zeros((2, 2, 1), jnp.int32)
wl = jnp.ones((2, 6, 2, 3))  # [layers, d, heads, h]
good_points = {"n": [4], "d": [2], "sigma": [1.0], "weight_scale": [1.0], "k": [2], "eps": [0.1]}

ROWS += [
  Row(
    "block_sparse_gather_attention",
    "query",
    "integer dtype",
    TypeError,
    "query must have a floating dtype",
    (i32, kv, kv, bidx),
    {"block_q": 2, "block_k": 2},
  ),
  Row(
    "block_sparse_gather_attention",
    "block_q",
    "`block_q=0`",
    ValueError,
    "block_q=0 must be >= 1",
    (bq, kv, kv, bidx),
    {"block_q": 0, "block_k": 2},
  ),
  Row(
    "block_sparse_gather_attention",
    "block_k",
    "`block_k=2.0`",
    TypeError,
    "block_k must be an int",
    (bq, kv, kv, bidx),
    {"block_q": 2, "block_k": 2.0},
  ),
  Row(
    "block_sparse_gather_attention",
    "block_indices",
    "floating dtype",
    TypeError,
    "block_indices must have an integer dtype",
    (bq, kv, kv, bidx.astype(jnp.float32)),
    {"block_q": 2, "block_k": 2},
  ),
  Row(
    "block_sparse_gather_attention",
    "block_indices",
    "shape not [..., ceil(T / block_q), N, nb]",
    ValueError,
    "block_indices must have shape [batch..., ceil(T / block_q), N, nb]",
    (bq, kv, kv, jnp.zeros((3, 2, 1), jnp.int32)),
    {"block_q": 2, "block_k": 2},
  ),
  Row(
    "block_sparse_gather_attention",
    "block_indices",
    "nb = 0 blocks",
    ValueError,
    "block_indices must select at least one key block",
    (bq, kv, kv, bidx[..., :0]),
    {"block_q": 2, "block_k": 2},
  ),
  Row(
    "block_sparse_gather_attention",
    "is_causal",
    "`is_causal=1`",
    TypeError,
    "is_causal must be a bool",
    (bq, kv, kv, bidx),
    {"block_q": 2, "block_k": 2, "is_causal": 1},
  ),
  Row(
    "block_sparse_gather_attention",
    "implementation",
    "unknown name",
    ValueError,
    "implementation='cuda' must be",
    (bq, kv, kv, bidx),
    {"block_q": 2, "block_k": 2, "implementation": "cuda"},
  ),
  Row(
    "block_sparse_gather_attention",
    "implementation",
    '`"pallas"` with float64 inputs',
    TypeError,
    'implementation="pallas" cannot take query of dtype float64',
    (np.ones((3, 2, 4)), np.ones((5, 1, 4)), np.ones((5, 1, 4)), bidx),
    {"block_q": 2, "block_k": 2, "implementation": "pallas"},
    x64=True,
  ),
  Row(
    "selection_recall",
    "indices",
    "floating dtype",
    TypeError,
    "indices must have an integer dtype",
    (jnp.zeros((3, 2)), jnp.zeros((3, 2), jnp.int32)),
    {},
  ),
  Row(
    "selection_recall",
    "reference",
    "a scalar",
    ValueError,
    "reference must have at least 1 dimension",
    (jnp.zeros((3, 2), jnp.int32), jnp.int32(0)),
    {},
  ),
  Row(
    "selection_recall",
    "reference",
    "leading dims differ from indices",
    ValueError,
    "indices and reference must have the same leading dimensions",
    (jnp.zeros((3, 2), jnp.int32), jnp.zeros((4, 2), jnp.int32)),
    {},
  ),
  Row(
    "interaction_norms",
    "m",
    "integer dtype",
    TypeError,
    "m must have a floating dtype",
    (jnp.ones((3, 3), jnp.int32),),
    {},
  ),
  Row(
    "interaction_norms",
    "m",
    "fewer than 2 dims",
    ValueError,
    "m must have at least 2 dimensions",
    (jnp.ones(3),),
    {},
  ),
  Row(
    "interaction_norms_from_weights",
    "w_k",
    "shape differs from w_q",
    ValueError,
    "must both be [d, heads, h] or [d, h]",
    (w.w_q, jnp.ones((6, 2, 2))),
    {},
  ),
  Row(
    "binomial_upper_quantile",
    "trials",
    "`trials=2.5`",
    ValueError,
    "trials=2.5 must be an integer >= 0",
    (),
    {"trials": 2.5, "p": 0.5, "delta": 0.1},
  ),
  Row(
    "binomial_upper_quantile",
    "p",
    "`p=1.5`",
    ValueError,
    "p=1.5 must be in [0, 1]",
    (),
    {"trials": 10, "p": 1.5, "delta": 0.1},
  ),
  Row(
    "binomial_upper_quantile",
    "delta",
    "`delta=1.0`",
    ValueError,
    "delta=1.0 must be in (0, 1)",
    (),
    {"trials": 10, "p": 0.5, "delta": 1.0},
  ),
  Row(
    "tau_range",
    "n",
    "`n=0`",
    ValueError,
    "n=0 must be an integer >= 1",
    (),
    {"n": 0, "sigma": 1.0, "norms": norms},
  ),
  Row(
    "tau_range",
    "sigma",
    "`sigma=0.0`",
    ValueError,
    "sigma=0.0 must be > 0",
    (),
    {"n": 8, "sigma": 0.0, "norms": norms},
  ),
  Row(
    "tau_range",
    "norms",
    "not InteractionNorms",
    TypeError,
    "norms must be an InteractionNorms (or 3-tuple)",
    (),
    {"n": 8, "sigma": 1.0, "norms": 1.0},
  ),
  Row(
    "tau_range",
    "norms",
    "a negative norm",
    ValueError,
    "norms.operator=-1.0 must be >= 0",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms._replace(operator=-1.0)},
  ),
  Row(
    "sparsity_bound",
    "n",
    "`n=2.5`",
    ValueError,
    "n=2.5 must be an integer >= 1",
    (),
    {"n": 2.5, "sigma": 1.0, "norms": norms, "eps": 0.1},
  ),
  Row(
    "sparsity_bound",
    "eps",
    "`eps=1.0`",
    ValueError,
    "eps=1.0 must be in (0, 1)",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "eps": 1.0},
  ),
  Row(
    "sparsity_bound",
    "eps",
    "`eps=None`",
    TypeError,
    "eps must be a real number or array",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "eps": None},
  ),
  Row(
    "sparsity_bound",
    "delta",
    "`delta=0.0`",
    ValueError,
    "delta=0.0 must be in (0, 1)",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "eps": 0.1, "delta": 0.0},
  ),
  Row(
    "sparsity_eps_bound",
    "k",
    "`k=0`",
    ValueError,
    "k=0 must be an integer >= 1",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "k": 0},
  ),
  Row(
    "sparsity_eps_bound",
    "sigma",
    "`sigma=-1.0`",
    ValueError,
    "sigma=-1.0 must be > 0",
    (),
    {"n": 8, "sigma": -1.0, "norms": norms, "k": 2},
  ),
  Row(
    "value_norm_bound",
    "delta",
    "`delta=0.0`",
    ValueError,
    "delta=0.0 must be in (0, 1)",
    (),
    {"n": 8, "sigma": 1.0, "value_norms": norms, "delta": 0.0},
  ),
  Row(
    "value_norm_bound",
    "value_norms",
    "not InteractionNorms",
    TypeError,
    "norms must be an InteractionNorms (or 3-tuple)",
    (),
    {"n": 8, "sigma": 1.0, "value_norms": None, "delta": 0.1},
  ),
  Row(
    "topk_error_bound",
    "k",
    "`k=1.5`",
    ValueError,
    "k=1.5 must be an integer >= 1",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "k": 1.5, "value_norm": 1.0},
  ),
  Row(
    "topk_error_bound",
    "value_norms, value_norm",
    "neither given",
    ValueError,
    "exactly one of value_norms and value_norm must be given",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "k": 2},
  ),
  Row(
    "topk_error_bound",
    "value_norm",
    "`value_norm=-1.0`",
    ValueError,
    "value_norm=-1.0 must be >= 0",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "k": 2, "value_norm": -1.0},
  ),
  Row(
    "power_law_k",
    "alpha",
    "`alpha=0.0`",
    ValueError,
    "alpha=0.0 must be > 0",
    (),
    {"n": 8, "alpha": 0.0, "C": 0.5},
  ),
  Row(
    "power_law_k",
    "C",
    "`C=1.5`",
    ValueError,
    "C=1.5 must be in [0, 1]",
    (),
    {"n": 8, "alpha": 1.0, "C": 1.5},
  ),
  Row(
    "power_law_error_bound",
    "C",
    "`C=-0.5`",
    ValueError,
    "C=-0.5 must be in [0, 1]",
    (),
    {"n": 8, "sigma": 1.0, "norms": norms, "alpha": 1.0, "C": -0.5, "value_norm": 1.0},
  ),
  Row(
    "power_law_error_bound",
    "value_norms, value_norm",
    "both given",
    ValueError,
    "exactly one of value_norms and value_norm must be given",
    (),
    {
      "n": 8,
      "sigma": 1.0,
      "norms": norms,
      "alpha": 1.0,
      "C": 0.5,
      "value_norms": norms,
      "value_norm": 1.0,
    },
  ),
  Row(
    "predicted_tail_mass",
    "tau",
    "`tau=-1.0`",
    ValueError,
    "tau=-1.0 must be >= 0",
    (),
    {"n": 8, "tau": -1.0, "k": 2},
  ),
  Row(
    "predicted_tail_mass",
    "k",
    "`k=0.5`",
    ValueError,
    "k=0.5 must be >= 1",
    (),
    {"n": 8, "tau": 1.0, "k": 0.5},
  ),
  Row("rem_boundaries", "n", "`n=0`", ValueError, "n=0 must be an integer >= 1", (), {"n": 0}),
  Row(
    "rem_boundaries",
    "n",
    "`n=float('inf')`",
    ValueError,
    "n=inf must be finite",
    (),
    {"n": float("inf")},
  ),
  Row(
    "rem_regime",
    "tau",
    "`tau=-1.0`",
    ValueError,
    "tau=-1.0 must be >= 0",
    (),
    {"n": 8, "tau": -1.0},
  ),
  Row(
    "rem_regime",
    "n",
    "`n=0`",
    ValueError,
    "n=0 must be an integer >= 1",
    (),
    {"n": 0, "tau": 1.0},
  ),
  Row(
    "predicted_effective_support",
    "n",
    "`n=2.5`",
    ValueError,
    "n=2.5 must be an integer >= 1",
    (),
    {"n": 2.5, "tau": 1.0},
  ),
  Row(
    "predicted_effective_support",
    "tau",
    "`tau='a'`",
    TypeError,
    "tau must be a real number or array",
    (),
    {"n": 8, "tau": "a"},
  ),
  Row(
    "rank_layers_by_sparsity",
    "w_q",
    "not [layers, d, heads, h]",
    ValueError,
    "w_q and w_k must both be [layers, d, heads, h]",
    (wl[0], wl[0]),
    {"n": 8},
  ),
  Row(
    "rank_layers_by_sparsity",
    "w_k",
    "integer dtype",
    TypeError,
    "w_k must have a floating dtype",
    (wl, wl.astype(jnp.int32)),
    {"n": 8},
  ),
  Row(
    "run_sweep",
    "points",
    "a column missing",
    ValueError,
    "points is missing the parameter columns ['eps']",
    (),
    {
      "points": {k: v for k, v in good_points.items() if k != "eps"},
      "key": key,
      "trials": 1,
    },
  ),
  Row(
    "run_sweep",
    "points",
    "`k` above `n`",
    ValueError,
    "points['k'][0]=5 must be in [1, n=4]",
    (),
    {"points": {**good_points, "k": [5]}, "key": key, "trials": 1},
  ),
  Row(
    "run_sweep",
    "points",
    "`eps` outside (0, 1)",
    ValueError,
    "points['eps'][0]=1.0 must be in the open interval (0, 1)",
    (),
    {"points": {**good_points, "eps": [1.0]}, "key": key, "trials": 1},
  ),
  Row(
    "run_sweep",
    "trials",
    "`trials=0`",
    ValueError,
    "trials=0 must be >= 1",
    (),
    {"points": good_points, "key": key, "trials": 0},
  ),
  Row(
    "run_sweep",
    "mesh",
    "unknown name",
    ValueError,
    "mesh='gpu' must be a Mesh, None or 'auto'",
    (),
    {"points": good_points, "key": key, "trials": 1, "mesh": "gpu"},
  ),
  Row(
    "run_sweep",
    "common_random_numbers",
    "not a bool",
    TypeError,
    "common_random_numbers must be a bool, got 1",
    (),
    {"points": good_points, "key": key, "trials": 1, "common_random_numbers": 1},
  ),
  Row(
    "ExactSelection",
    "search_steps",
    "negative",
    ValueError,
    "search_steps=-1 must be >= 0",
    (),
    {"search_steps": -1},
  ),
  Row(
    "ExactSelection",
    "candidate_blocks",
    "`candidate_blocks=0`",
    ValueError,
    "candidate_blocks=0 must be >= 1",
    (),
    {"candidate_blocks": 0},
  ),
  Row(
    "ExactSelection",
    "causal_groups",
    "`causal_groups=0`",
    ValueError,
    "causal_groups=0 must be >= 1",
    (),
    {"causal_groups": 0},
  ),
  Row(
    "FusedExactSelection",
    "block_q",
    "not a power of two",
    ValueError,
    "block_q=3 must be a power of two",
    (),
    {"block_q": 3},
  ),
  Row(
    "FusedExactSelection",
    "interpret",
    "not a bool",
    TypeError,
    "interpret must be a bool or None, got 1",
    (),
    {"interpret": 1},
  ),
]


def _row_id(row: Row) -> str:
  return f"{row.function}-{row.argument}-{row.bad_input}"


def _call(row: Row, jit: bool):
  # A name moved out of the top level is called from its home (the alias warns, on purpose).
  home = importlib.import_module(gsparse._MOVED.get(row.function, "gsparse"))
  fn: Callable = getattr(home, row.function)
  with jax.enable_x64(row.x64):
    if not jit:
      return fn(*row.args, **row.kwargs)
    return jax.jit(lambda *a: fn(*a, **row.kwargs))(*row.args)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("row", ROWS, ids=[_row_id(r) for r in ROWS])
def test_row_raises_as_documented(row, jit):
  with pytest.raises(row.error, match=re.escape(row.message)):
    _call(row, jit)


def _markdown_rows() -> set[tuple[str, ...]]:
  lines = DOCS.read_text().splitlines()
  start = lines.index("<!-- errors-table:start -->")
  end = lines.index("<!-- errors-table:end -->")
  rows = set()
  for line in lines[start + 1 : end]:
    if not line.startswith("| `") or line.startswith("|---"):
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    rows.add(tuple(cells))
  return rows


def docs_row(row: Row) -> tuple[str, ...]:
  """The docs/errors.md cells of a row."""
  return (
    f"`{row.function}`",
    f"`{row.argument}`",
    row.bad_input,
    f"`{row.error.__name__}`",
    f"`{row.message}`",
  )


def test_docs_table_matches():
  expected = {docs_row(r) for r in ROWS}
  actual = _markdown_rows()
  missing, extra = expected - actual, actual - expected
  assert not missing and not extra, (
    f"docs/errors.md is out of date. Missing rows:\n{sorted(missing)}\nStale rows:\n{sorted(extra)}\n"
    "Regenerate with: python -c 'import tests.errors_test as t; print(t.markdown_table())'"
  )


def markdown_table() -> str:
  """The table for docs/errors.md, in ROWS order (duplicates removed)."""
  out = [
    "| Function | Argument | Bad input | Error | Message contains |",
    "|---|---|---|---|---|",
  ]
  seen = set()
  for r in ROWS:
    cells = docs_row(r)
    if cells not in seen:
      seen.add(cells)
      out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def test_every_public_function_has_a_row():
  # The top-level core and the names that moved from the top level to their
  # home submodules (`gsparse._MOVED`).
  homes = {name: gsparse for name in gsparse.__all__}
  homes.update({name: importlib.import_module(mod) for name, mod in gsparse._MOVED.items()})
  functions = {
    name
    for name, home in homes.items()
    if inspect.isfunction(getattr(home, name)) and not name[0].isupper()
  }
  covered = {r.function for r in ROWS}
  assert functions <= covered, f"public functions without documented checks: {functions - covered}"
