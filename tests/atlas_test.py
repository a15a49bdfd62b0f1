"""Tests of gsparse.atlas: recorded statistics, masks, fits, recommendation, bad input."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gsparse.flax as gf
from gsparse import atlas
from gsparse.atlas import stats as atlas_stats
from gsparse.train import model as lm


def _np_rows(q, k, bias, mask, *, causal):
  """Exact float64 softmax rows `[B, N, T, S]`, their logits and admissibility (NumPy)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  g = q.shape[2] // k.shape[2]
  k = np.repeat(k, g, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]) + np.asarray(bias)
  valid = np.broadcast_to(np.asarray(mask), logits.shape).copy()
  if causal:
    valid &= np.tril(np.ones(logits.shape[-2:], bool))
  e = np.where(valid, np.exp(logits - np.where(valid, logits, -np.inf).max(-1, keepdims=True)), 0)
  z = e.sum(-1, keepdims=True)
  return np.where(z > 0, e / np.where(z > 0, z, 1), 0), logits, valid


def test_row_statistics_match_exact_softmax():
  rng = np.random.default_rng(0)
  b, t, n, kh, h = 2, 11, 4, 2, 8
  q = 2.0 * rng.standard_normal((b, t, n, h), np.float32)
  k, v = rng.standard_normal((2, b, t, kh, h), np.float32)
  bias = 0.5 * rng.standard_normal((b, 1, t, t), np.float32)
  mask = rng.random((b, 1, t, t)) < 0.7
  mask[..., 0] = True
  mask[1, :, 3, :] = False  # one fully masked row
  tols, cands = (0.02, 0.2), (2, 4, 8)
  got = atlas.row_statistics(
    q, k, bias, mask, tolerances=tols, candidates=cands, is_causal=True, chunk=4
  )
  p, logits, valid = _np_rows(q, k, bias, mask, causal=True)
  m = valid.sum(-1)
  np.testing.assert_array_equal(got.num_keys, m)
  s2 = (p * p).sum(-1)
  np.testing.assert_allclose(
    got.effective_support, np.where(m > 0, 1 / np.maximum(s2, 1e-300), 0), rtol=1e-4
  )
  mean = np.where(valid, logits, 0).sum(-1) / np.maximum(m, 1)
  var = np.where(valid, (logits - mean[..., None]) ** 2, 0).sum(-1) / np.maximum(m, 1)
  np.testing.assert_allclose(got.tau, np.sqrt(var), rtol=1e-4, atol=1e-5)
  ps = -np.sort(-p, -1)
  for i, tol in enumerate(tols):
    want = np.zeros(m.shape, int)
    for idx in np.ndindex(m.shape):
      if m[idx]:
        want[idx] = min(j for j in range(1, t + 1) if 1.0 - ps[idx][:j].sum() <= tol)
    np.testing.assert_array_equal(got.needed_k[i], want)
    # CertifiedK's own choice: gsparse.flax.sparse_attention with that policy.
    certified = jax.jit(
      lambda *a, tol=tol: (
        gf.sparse_attention(
          *a, is_causal=True, return_residuals=True, policy=gf.CertifiedK(ks=cands, tol=tol)
        ).num_kept
      )
    )
    kept = np.swapaxes(np.asarray(certified(q, k, v, bias, mask)), -2, -1)
    np.testing.assert_array_equal(np.where(m > 0, got.certified_k[i], 0), np.where(m > 0, kept, 0))
  assert got.needed_k[:, 1, :, 3].max() == 0 and got.effective_support[1, :, 3].max() == 0


class _Bert(nn.Module):
  """A small BERT-like encoder: token + position embedding, post-LN blocks, padding mask."""

  @nn.compact
  def __call__(self, tokens, pad):
    pos = self.param("pos", nn.initializers.normal(1.0), (32, 16))
    x = nn.Embed(50, 16)(tokens) + pos[: tokens.shape[1]]
    mask = pad[:, None, None, :]  # [B, 1, 1, T]: padded keys masked (as BERT does)
    for i in range(2):
      a = nn.MultiHeadDotProductAttention(num_heads=2, name=f"layer_{i}")(x, x, mask=mask)
      x = nn.LayerNorm()(x + a)
      x = nn.LayerNorm()(x + nn.Dense(16)(nn.gelu(nn.Dense(32)(x))))
    return x


def _bert():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 32)), jnp.int32)
  pad = jnp.arange(32)[None, :] < jnp.array([[32], [20]])
  model = _Bert()
  return model, jax.jit(model.init)(jax.random.key(2), tokens, pad), tokens, pad


def test_bert_like_linen_padding_recommend_and_validate():
  model, variables, tokens, pad = _bert()
  runner = atlas.linen_runner(model, variables, max_len=32)
  rec = atlas.Recorder(tolerances=(0.1,))
  np.testing.assert_array_equal(
    runner((tokens, pad), rec.wrap), model.apply(variables, tokens, pad)
  )
  at = atlas.measure_model(
    runner,
    (tokens, pad),
    tolerances=(0.05, 0.1),
    query_mask=pad,
    lengths=(16, 32),
    num_bootstrap=50,
  )
  assert (
    [x.path for x in at.layers]
    == list(gf.find_attention_layers(variables))
    == ["layer_0", "layer_1"]
  )
  layer = at.layer("layer_0")
  keys = layer.num_keys.reshape(2, 2, 32)  # [N, B, T]
  np.testing.assert_array_equal(keys[:, 0], 32)
  np.testing.assert_array_equal(keys[:, 1, :20], 20)  # padded keys are not counted
  assert np.isnan(keys[:, 1, 20:]).all()  # padded queries are left out
  assert np.all(np.isfinite(layer.predicted_weights)) and len(layer.fits[0]) == 2
  config = atlas.recommend(at, tolerance=0.1, quantile=1.0, max_fraction=1.0)
  assert set(config) == {"layer_0", "layer_1"} and all(isinstance(k, int) for k in config.values())
  one = atlas.validate(
    runner, {p: 1 for p in config}, (tokens, pad), repeats=1, loss_fn=lambda y, a: jnp.mean(y**2)
  )
  assert one.output_change > 1e-2  # the config is applied
  assert np.isfinite(one.loss_change) and one.time_dense_s > 0 and one.time_sparse_s > 0
  fn = gf.attention_fn_for(config, "layer_0")
  assert isinstance(fn, gf.TopKAttentionFn) and fn.policy.k == config["layer_0"]
  with pytest.raises(ValueError, match="was not measured"):
    atlas.recommend(at, tolerance=0.3)


class _Nnx(nnx.Module):
  def __init__(self, rngs):
    kw = dict(num_heads=2, in_features=8, decode=False, rngs=rngs)
    self.first, self.second = nnx.MultiHeadAttention(**kw), nnx.MultiHeadAttention(**kw)

  def __call__(self, x):
    mask = nnx.make_causal_mask(x[..., 0])
    return self.second(self.first(x, mask=mask), mask=mask)


def test_nnx_causal_and_configure_nnx():
  model = _Nnx(nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 24, 8)), jnp.float32)
  at = atlas.measure_model(atlas.nnx_runner(model), x, tolerances=0.1, lengths=())
  assert [y.path for y in at.layers] == ["first", "second"] and at.layers[0].fits is None
  np.testing.assert_array_equal(at.layers[1].num_keys[0], np.arange(1, 25))  # causal
  config = atlas.recommend(at, tolerance=0.1, max_fraction=1.0)
  assert gf.configure_nnx(model, config) == ["first", "second"]
  assert isinstance(model.first.attention_fn, gf.TopKAttentionFn)


@pytest.mark.slow  # trains a model first; the linen and nnx runners are tested by default above
def test_transformer_lm_after_training_matches_its_own_measurement():
  cfg = lm.ModelConfig(d_model=32, num_layers=2, num_heads=2, max_len=64)
  model = lm.TransformerLM(cfg, lm.layer_specs(lm.AttentionSpec("dense"), 2, []))
  text = np.frombuffer(b"def f(x):\n  return x * 2 + 1\n" * 20, np.uint8).astype(np.int32)
  batch = jnp.asarray(text[: 4 * 65].reshape(4, 65))
  variables = jax.jit(model.init)(jax.random.key(4), batch[:, :64])
  opt = optax.adam(1e-2)
  state = opt.init(variables)

  @jax.jit
  def step(v, s):
    loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(v, batch[:, :-1]), batch[:, 1:]
    ).mean()
    g = jax.grad(loss)(v)
    u, s = opt.update(g, s)
    return optax.apply_updates(v, u), s

  for _ in range(5):
    variables, state = step(variables, state)
  tokens = batch[:2, :64]
  runner = atlas.linen_runner(model, variables, max_len=64)
  at = atlas.measure_model(runner, tokens, tolerances=(0.05,), lengths=(32, 64), num_bootstrap=50)
  assert len(at.layers[0].fits[0]) == 2
  # The model's own sown measurement (gsparse.train.model.measuring_attention_fn).
  measuring = lm.TransformerLM(cfg, model.attention, lm.MeasureSpec(eps=0.01, k=8))
  apply = jax.jit(lambda v, x: measuring.apply(v, x, True, mutable=["intermediates"]))
  _, inter = apply(variables, tokens)
  for i, layer in enumerate(at.layers):
    sown = inter["intermediates"][f"block_{i}"]["attention"]["effective_support"][0]
    np.testing.assert_allclose(layer.support(), sown, rtol=1e-4)
    np.testing.assert_array_equal(layer.num_keys[0, :64], np.arange(1, 65))
    assert np.all(np.isfinite(layer.predicted_weights))
  with pytest.raises(ValueError, match="longer than the model's max_len=64"):
    atlas.measure_model(runner, jnp.zeros((1, 65), jnp.int32))


def test_fit_recovers_known_exponent():
  # 300 rows per length, log-normal noise (sigma 0.5) around 3 n^0.6; fixed seeds, so the
  # outcome is deterministic; the standard error of the slope is about 0.02.
  rng = np.random.default_rng(5)
  lengths = (128, 256, 512, 1024, 2048)
  rows = [3.0 * n**0.6 * np.exp(0.5 * rng.standard_normal(300)) for n in lengths]
  fit = atlas.fit_power_law(lengths, rows, seed=0)
  assert abs(fit.c - 0.6) < 0.05 and fit.c_low < 0.6 < fit.c_high and fit.c_high - fit.c_low < 0.2
  assert abs(np.log(fit.alpha / 3.0)) < 0.3
  assert atlas.classify_phase(fit) == "n^C"
  flat = atlas.fit_power_law(lengths, [np.full(50, 2.0) for _ in lengths])
  assert atlas.classify_phase(flat) == "collapsed"
  lin = atlas.fit_power_law(lengths, [np.full(50, n / 4) for n in lengths])
  assert atlas.classify_phase(lin) == "diffuse" and abs(lin.c - 1) < 1e-9
  with pytest.raises(ValueError, match="at least 2 distinct"):
    atlas.fit_power_law((128,), [np.ones(3)])


class _NoAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(x)


class _OneVmapped(nn.Module):
  """Two attention layers; the second runs under `nn.vmap`, so its rows are batch-traced."""

  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=2, name="plain")(x)
    vmapped = nn.vmap(
      nn.MultiHeadDotProductAttention,
      variable_axes={"params": None},
      split_rngs={"params": False},
    )
    return vmapped(num_heads=2, name="vmapped")(x[None])[0]


def test_bad_input():
  x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 8, 4)), jnp.float32)
  dense = _NoAttention()
  runner = atlas.linen_runner(dense, jax.jit(dense.init)(jax.random.key(7), x))
  with pytest.raises(ValueError, match="no attention layer found.*MultiHeadDotProductAttention"):
    atlas.measure_model(runner, x, tolerances=0.1)
  model = _OneVmapped()
  runner = atlas.linen_runner(model, jax.jit(model.init)(jax.random.key(8), x), max_len=8)
  for tol in (0.0, 1.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="tolerance"):
      atlas.measure_model(runner, x, tolerances=(0.1, tol))
  with pytest.raises(ValueError, match="max_len=8"):
    atlas.measure_model(runner, jnp.zeros((1, 9, 4)))
  with pytest.warns(UserWarning, match="'vmapped' not recorded: its inputs are transformed"):
    at = atlas.measure_model(runner, x, tolerances=0.1, lengths=())
  assert [y.path for y in at.layers] == ["plain"] and "vmapped" in at.skipped
  assert atlas.recommend(at, tolerance=0.1, max_fraction=1.0)["vmapped"] is None
  md = atlas.markdown(at, tolerance=0.1)
  assert "| vmapped | its inputs are transformed" in md


def test_stats_needed_k_sums_tail_from_the_small_end():
  p = jnp.array([[1.0 - 3e-9, 1e-9, 1e-9, 1e-9]])
  assert int(atlas_stats.needed_k(p, 2.5e-9)[0]) == 2  # tail after 2 entries: 2e-9


@pytest.mark.slow  # trains and checkpoints a model first; docs/atlas.md runs the atlas by default
def test_cli_writes_report_from_training_checkpoint(tmp_path):
  import json
  import types

  from gsparse.atlas import cli
  from gsparse.train import checkpoint as ckpt
  from gsparse.train.experiment import TrainConfig, init_state

  mc = lm.ModelConfig(d_model=16, num_layers=2, num_heads=2, max_len=32)
  config = TrainConfig(model=mc, seq_len=32, steps=1)
  state = {**init_state(config), "step": jnp.int32(1)}  # as after one optimizer step
  log = {"config": config.to_dict(), "train": [{"step": 0}]}
  with ckpt.open_manager(tmp_path, keep=1) as manager:  # what run_training writes
    ckpt.save(manager, 1, state, config=config.to_dict(), log=log)
  (tmp_path / "text.py").write_bytes(b"for i in range(10):\n  print(i)\n" * 10)
  fl = types.SimpleNamespace(
    checkpoint=str(tmp_path),
    text=str(tmp_path / "text.py"),
    out=str(tmp_path / "out"),
    tolerances=["0.05", "0.1"],
    tolerance=0.1,
    seq_len=0,
    batch_size=2,
    validation_batch_size=1,
    chunk=16,
    quantile=0.9,
    repeats=1,
  )
  md = pathlib.Path(cli.main(fl)).read_text()
  assert "| block_1/attention | 1 |" in md and "checkpoint at step 1 of 1" in md
  for name in ("needed_k_heatmap", "needed_k_distributions", "power_law_fits"):
    assert (tmp_path / "out" / f"{name}.png").stat().st_size > 1000
  summary = json.loads((tmp_path / "out" / "atlas.json").read_text())
  assert set(summary["config"]) == {"block_0/attention", "block_1/attention"}
  with pytest.raises(ValueError, match="tolerance=1.5"):
    cli.main(types.SimpleNamespace(**{**vars(fl), "tolerances": ["1.5"]}))
  with pytest.raises(ValueError, match="fewer than 21 x 32"):
    cli.main(types.SimpleNamespace(**{**vars(fl), "batch_size": 20}))
