"""Smoke tests of the byte-level LM training experiment (gsparse.train).

Tiny configuration (2 layers, width 32, 32-byte sequences) so that every
variant compiles and runs a few steps quickly. Everything is seeded and
deterministic: no test depends on luck.
"""

import json
import math

import numpy as np
import pytest
import scipy.stats

from gsparse.train import data as data_lib
from gsparse.train import rank
from gsparse.train.experiment import VARIANTS, TrainConfig, run_training
from gsparse.train.model import AttentionSpec, MeasureSpec, ModelConfig

STEPS = 6


def tiny_config(variant: str, **kw) -> TrainConfig:
  base = dict(
    variant=variant,
    model=ModelConfig(d_model=32, num_layers=2, num_heads=2, max_len=32),
    sparse=AttentionSpec("topk", k=4, alpha=1.0, power=0.5, tolerance=0.2, candidate_ks=(2, 4, 8)),
    measure=MeasureSpec(eps=0.05, k=4),
    seq_len=32,
    batch_size=4,
    steps=STEPS,
    learning_rate=1e-2,
    warmup_steps=1,
    eval_every=STEPS,
    eval_batches=1,
    checkpoint_every=0,
    log_every=STEPS,
    select_layers=1,
    select_step=2,
  )
  base.update(kw)
  return TrainConfig(**base)


@pytest.fixture(scope="module")
def corpus():
  return data_lib.load_stdlib_corpus(max_train_bytes=100_000, max_validation_bytes=10_000)


class _Runs(dict):
  """Each variant's run, trained on first use (one compile of the model each)."""

  def __init__(self, corpus, tmp_path_factory):
    super().__init__()
    self._corpus, self._tmp = corpus, tmp_path_factory

  def __missing__(self, v):
    wd = self._tmp.mktemp(v)
    self[v] = (run_training(tiny_config(v), workdir=wd, corpus=self._corpus, progress=None), wd)
    return self[v]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
  return _Runs(corpus, tmp_path_factory)


# "power" and "certified" differ from "topk" only in the AttentionSpec the model
# is built with (tested in flax_test.py); each trains in the slow step of CI.
@pytest.mark.parametrize(
  "variant",
  [
    pytest.param(v, marks=[pytest.mark.slow] if v in ("power", "certified") else [])
    for v in VARIANTS
  ],
)
def test_variant_trains_and_measures(runs, variant):
  log, wd = runs[variant]
  losses = [r["loss"] for r in log["train"]]
  assert len(losses) == STEPS
  assert all(math.isfinite(x) for x in losses)
  # Falling: the last two steps are below the first (byte entropy starts near ln 256).
  assert max(losses[-2:]) < losses[0] - 0.3, losses
  fin = log["final"]
  assert math.isfinite(fin["val_bpb"]) and 0 < fin["val_bpb"] < 8.5
  sp = {k: np.asarray(v) for k, v in fin["sparsity"].items()}
  for v in sp.values():
    assert v.shape == (2, 2)
  assert np.all(sp["effective_support"] >= 1.0 - 1e-5) and np.all(
    sp["effective_support"] <= 32 + 1e-3
  )
  # The certificate is an upper bound on the exact tail mass row by row, hence on average.
  assert np.all(sp["tail_bound"] >= sp["tail_mass"] - 1e-6)
  assert np.all((sp["tail_bound_max"] >= sp["tail_bound"] - 1e-6) & (sp["tail_bound_max"] <= 1.0))
  assert np.asarray(fin["weight_norms"]).shape == (2, 2)
  kept, own = sp["kept"], sp["own_tail_bound"]
  if variant == "dense":
    # Causal rows of a 32-byte sequence admit 1..32 keys: 16.5 on average.
    np.testing.assert_allclose(kept, 16.5, rtol=1e-6)
    np.testing.assert_array_equal(own, 0.0)
  elif variant in ("topk", "power"):  # k = 4 (fixed) and round(1 * 32^0.5) = 6
    assert np.all(kept <= (4 if variant == "topk" else 6) + 1e-6)
  elif variant == "certified":
    assert np.all((kept >= 2 - 1e-6) & (kept <= 8 + 1e-6))
  assert np.all((own >= 0) & (own <= 1))
  on_disk = json.loads((wd / "log.json").read_text())
  assert on_disk["final"]["val_bpb"] == fin["val_bpb"]
  specs = fin["layer_specs"]
  if variant == "dense":
    assert specs == ["dense", "dense"]
  elif variant == "select":
    assert len(log["sparse_layers"]) == 1
    assert [s != "dense" for s in specs] == [i in log["sparse_layers"] for i in range(2)]
  else:
    assert all(s != "dense" for s in specs)


def test_resume_gives_same_next_loss(runs, corpus, tmp_path):
  # "select" switches layers to sparse at step 2: resuming at step 3 must
  # restore that choice as well as params and optimizer state.
  full, _ = runs["select"]
  cfg = tiny_config("select")
  part = run_training(cfg, workdir=tmp_path, corpus=corpus, stop_at_step=3, progress=None)
  assert len(part["train"]) == 3 and "final" not in part
  resumed = run_training(cfg, workdir=tmp_path, corpus=corpus, progress=None)
  assert resumed["sparse_layers"] == full["sparse_layers"]
  got = [r["loss"] for r in resumed["train"]]
  want = [r["loss"] for r in full["train"]]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert resumed["final"]["val_bpb"] == pytest.approx(full["final"]["val_bpb"], rel=1e-6)


def test_resume_rejects_other_config(runs, corpus, tmp_path):
  run_training(
    tiny_config("select"), workdir=tmp_path, corpus=corpus, stop_at_step=1, progress=None
  )
  with pytest.raises(ValueError, match="different config"):
    run_training(tiny_config("select", seed=1), workdir=tmp_path, corpus=corpus, progress=None)


def test_config_errors():
  with pytest.raises(ValueError, match="variant='sparse'"):
    tiny_config("sparse")
  with pytest.raises(ValueError, match="seq_len=64"):
    tiny_config("dense", seq_len=64)
  with pytest.raises(ValueError, match="select_layers=3"):
    tiny_config("select", select_layers=3)
  with pytest.raises(ValueError, match="power=1.5"):
    AttentionSpec("power", power=1.5)
  with pytest.raises(ValueError, match="candidate_ks"):
    AttentionSpec("certified", candidate_ks=(8, 4))


def test_spearman_matches_scipy():
  rng = np.random.default_rng(0)
  for n in (2, 5, 17):
    x = rng.integers(0, 4, n).astype(float)  # ties
    y = x + rng.normal(size=n)
    assert rank.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
  np.testing.assert_allclose(rank.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
  assert math.isnan(rank.spearman([1.0, 1.0], [1.0, 2.0]))


def test_rank_layers_picks_smallest_predicted_support():
  # At n = 4096: ln n = 8.318, a = sqrt(2 ln n) = 4.079. Per head log support (theory.md §6):
  # ln n - tau^2 for tau <= a/2, (a - tau)^2 up to a, 0 beyond. Layer means:
  # 0: 7.318; 1: (0 + 1.163) / 2 = 0.58; 2: 8.068; 3: (4.318 + 2.493) / 2 = 3.41.
  norms = np.array([[1.0, 1.0], [5.0, 3.0], [0.5, 0.5], [2.0, 2.5]])
  assert rank.rank_layers(norms, 2, seq_len=4096) == [1, 3]
  # One head per layer: the support falls with the norm, so the largest norms win.
  assert rank.rank_layers(np.array([0.5, 3.0, 1.0, 2.0]), 2, seq_len=4096) == [1, 3]
  # Where the mean norm and the support disagree, the support decides: layer 0 (4.5, 0.0) has
  # the larger mean norm (2.25 > 2.2), but mean log supports (0 + 8.318) / 2 = 4.16 against
  # (4.079 - 2.2)^2 = 3.53 for layer 1 (geometric-mean supports 64 and 34 keys).
  assert rank.rank_layers(np.array([[4.5, 0.0], [2.2, 2.2]]), 1, seq_len=4096) == [1]
  with pytest.raises(ValueError, match="num_sparse=5"):
    rank.rank_layers(norms, 5, seq_len=4096)


def test_weight_norms_scale_with_projection_weights():
  rng = np.random.default_rng(1)
  d, n, h = 8, 2, 4
  layers = {}
  for i, s in enumerate((1.0, 3.0)):
    layers[f"block_{i}"] = {
      "attention": {
        "query": {"kernel": s * rng.normal(size=(d, n, h))},
        "key": {"kernel": rng.normal(size=(d, n, h))},
      },
      "ln_attn": {"scale": np.ones(d)},
    }
  norms = rank.attention_weight_norms({"params": layers}, 2)
  assert norms.shape == (2, 2)
  m = layers["block_0"]["attention"]
  want = np.linalg.norm(m["query"]["kernel"][:, 0] @ m["key"]["kernel"][:, 0].T) / np.sqrt(h)
  assert norms[0, 0] == pytest.approx(want, rel=1e-6)


def test_split_by_path_hash_and_batches_deterministic(tmp_path):
  for i in range(40):
    sub = tmp_path / f"pkg{i % 3}"
    sub.mkdir(exist_ok=True)
    (sub / f"m{i}.py").write_text(f"x = {i}\n" * 20)
  (tmp_path / "site-packages").mkdir()
  (tmp_path / "site-packages" / "third.py").write_text("y = 1\n" * 20)
  c = data_lib.load_stdlib_corpus(root=str(tmp_path), validation_fraction=0.25)
  assert not set(c.train_files) & set(c.validation_files)
  assert len(c.train_files) + len(c.validation_files) == 40
  assert all("site-packages" not in f for f in c.train_files + c.validation_files)
  # A file's split depends only on its own path: removing other files keeps it.
  for f in c.train_files[:5]:
    (tmp_path / f).unlink()
  c2 = data_lib.load_stdlib_corpus(root=str(tmp_path), validation_fraction=0.25)
  assert c2.validation_files == c.validation_files
  b1 = data_lib.train_batch(c.train, seed=3, step=7, batch_size=2, seq_len=16)
  b2 = data_lib.train_batch(c.train, seed=3, step=7, batch_size=2, seq_len=16)
  b3 = data_lib.train_batch(c.train, seed=3, step=8, batch_size=2, seq_len=16)
  assert b1.shape == (2, 17) and b1.dtype == np.int32
  np.testing.assert_array_equal(b1, b2)
  assert not np.array_equal(b1, b3)
  v = data_lib.validation_batches(c.validation, num_batches=2, batch_size=2, seq_len=16)
  assert v.shape == (2, 2, 17)


def test_long_preset_fills_flags_not_given():
  """`--preset=long` sets sequence length 2048 and its other values, a flag on
  the command line wins, and the result is a valid `TrainConfig`."""
  from absl import flags

  from gsparse.train import cli

  fv = flags.FlagValues()
  cli.define_flags(flag_values=fv)
  fv(["train", "--preset=long", "--steps=7", "--variant=topk"])
  cli.apply_preset(fv)
  cfg = cli.config_from_flags(fv)
  assert (cfg.seq_len, cfg.model.max_len, cfg.batch_size, cfg.model.num_layers) == (
    2048,
    2048,
    2,
    2,
  )
  assert (cfg.steps, cfg.variant, cfg.eval_every) == (7, "topk", 20)
  assert "interleave_every" not in fv  # train_compare's flag: skipped here


def test_compare_summary_and_markdown(runs):
  from gsparse.train import compare

  variants = ("dense", "topk", "select")  # the runs the default step trains
  logs = {v: [runs[v][0], runs[v][0]] for v in variants}  # two identical "seeds"
  summary = compare.summarize(logs)
  rows = summary["variants"]
  assert list(rows) == list(variants)
  assert rows["dense"]["val_bpb_minus_dense"] == 0.0
  for v in variants:
    fin = runs[v][0]["final"]
    assert rows[v]["val_bpb_mean"] == pytest.approx(fin["val_bpb"])
    assert rows[v]["val_bpb_minus_dense"] == pytest.approx(
      fin["val_bpb"] - runs["dense"][0]["final"]["val_bpb"]
    )
    assert len(rows[v]["per_layer"]["tail_bound"]) == 2
  md = compare.markdown(summary, measure_eps=0.05, measure_k=4)
  assert md.count("\n| select |") == 3 and "tail@4" in md


def test_logs_at_step_reads_run_directories(runs, tmp_path):
  import shutil

  from gsparse.train import compare

  for v in ("dense", "topk"):
    shutil.copytree(runs[v][1], tmp_path / f"{v}_seed0")
  step, logs = compare.logs_at_step(tmp_path)
  assert step == STEPS and list(logs) == ["dense", "topk"]
  for v in logs:
    got, want = logs[v][0]["final"], runs[v][0]["final"]
    assert got["val_bpb"] == want["val_bpb"]
    assert got["weight_norms"] == want["weight_norms"]
    assert got["spearman_head_norm_vs_neg_effective_support"] == pytest.approx(
      want["spearman_head_norm_vs_neg_effective_support"]
    )
