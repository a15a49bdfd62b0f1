"""The end-to-end attention benchmark (gsparse/attention_bench.py, scripts/bench_attention.py).

Checks what the benchmark records, not how fast anything is: timing targets
are checked by running the benchmark, never by a timed test.
"""

import json
import os
import statistics

import jax
import pytest

from gsparse import attention_bench as ab


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One in-process run of the smoke preset (one method, both modes, two n)."""
  out = tmp_path_factory.mktemp("bench_attention")
  argv = ["--preset=smoke", "--methods=default", f"--out_dir={out}", "--pairs=3", "--seed=3"]
  returned = ab.main(argv)
  with open(os.path.join(out, "bench_attention.json")) as f:
    written = json.load(f)
  return out, returned, written


def test_smoke_json_header(smoke):
  _, _, written = smoke
  for field in ("date", "jax_version", "device_kind", "backend", "command_line", "grid"):
    assert written[field], field
  assert written["jax_version"] == jax.__version__
  assert written["grid"]["preset"] == "smoke"
  assert "--preset=smoke" in written["command_line"]


def test_smoke_records_cover_the_grid(smoke):
  _, _, written = smoke
  recs = written["records"]
  grid = written["grid"]
  got = {(r["method"], r["mode"], r["causal"], r["n"], r["k"]) for r in recs}
  want = {
    ("default", m, c, n, k)
    for m in grid["modes"]
    for c in grid["causal"]
    for n in grid["ns"]
    for k in grid["ks"]
  }
  assert got == want and len(recs) == len(want)
  for r in recs:
    assert r["error"] is None, r["error"]
    assert (r["heads"], r["head_dim"], r["dtype"]) == (2, 16, "float32")
    assert r["dense_implementation"] == "xla"  # CPU: never cuDNN
    assert r["default_selection"] == ab.topk_lib.DEFAULT_SELECTION
    assert r["compile_s"]["dense"] > 0 and r["compile_s"]["method"] > 0
    for which in ("dense", "method"):
      mem = r["xla_memory"][which]
      assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"])
      # The arguments: q, k, v (float32), plus the float32 cotangent in fwd+bwd
      # (jit drops the argument the forward does not use).
      arrays = 3 if r["mode"] == "fwd" else 4
      assert mem["argument_bytes"] == arrays * r["n"] * r["heads"] * r["head_dim"] * 4


def test_ratio_is_median_of_pair_ratios(smoke):
  _, _, written = smoke
  for r in written["records"]:
    assert len(r["dense_s"]) == len(r["method_s"]) == 3
    pair_ratios = [m / d for d, m in zip(r["dense_s"], r["method_s"], strict=True)]
    assert r["ratio"] == pytest.approx(statistics.median(pair_ratios), rel=1e-12)
    assert r["dense_median_s"] == pytest.approx(statistics.median(r["dense_s"]), rel=1e-12)
    assert r["method_median_s"] == pytest.approx(statistics.median(r["method_s"]), rel=1e-12)


def test_smoke_writes_table_and_figure(smoke):
  out, returned, written = smoke
  assert returned["records"] == written["records"]
  with open(os.path.join(out, "table.md")) as f:
    table = f.read()
  assert table.startswith("| method | mode | causal | k | n=128 (H=2) | n=256 (H=2) |")
  rows = [line for line in table.splitlines() if line.startswith("| default")]
  assert len(rows) == 2  # fwd and fwd+bwd
  r = written["records"][0]
  assert f"{r['ratio']:.2f}x" in rows[0]
  pytest.importorskip("matplotlib")
  assert os.path.getsize(os.path.join(out, "bench_attention.png")) > 1000


def test_gpu_preset_dry_run_traces_every_method(capsys):
  # The smallest n is the one traced; at 1024 the exact selection still runs
  # several query chunks, and tracing takes half the time it does at 4096.
  res = ab.main(["--preset=gpu", "--dry_run", "--n=1024,65536", "--k=64,256"])
  assert res["grid"]["dtype"] == "bfloat16" and res["grid"]["heads"] == 128
  pts = res["points"]
  assert len(pts) == 2 * 2 * 2 * len(ab.METHODS) * 2  # n x causal x mode x method x k
  printed = capsys.readouterr().out
  for method in ("dense", *ab.METHODS):
    assert f"# traced {method} fwd+bwd at n=1024" in printed


def test_causal_only_from_fwd_only_from_and_long_heads():
  argv = ["--preset=cpu", "--n=2048,8192,16384", "--k=64", "--methods=exact"]
  args = ab.parse_args([*argv, "--causal_only_from=8192", "--fwd_only_from=16384"])
  pts = ab.points(ab.resolve_grid(args))
  assert {(p["n"], p["causal"], p["mode"]) for p in pts} == {
    (2048, False, "fwd"),
    (2048, False, "fwd+bwd"),
    (2048, True, "fwd"),
    (2048, True, "fwd+bwd"),
    (8192, True, "fwd"),
    (8192, True, "fwd+bwd"),
    (16384, True, "fwd"),
  }
  assert len(pts) == 7
  assert {(p["n"], p["heads"]) for p in pts} == {(2048, 4), (8192, 1), (16384, 1)}


@pytest.mark.parametrize(
  "argv, match",
  [
    (["--methods=dense,bogus"], "methods"),
    (["--modes=bwd"], "modes"),
    (["--k=0"], "--k"),
    (["--pairs=0"], "pairs"),
    (["--causal=maybe"], "causal"),
  ],
)
def test_bad_flags_raise_value_error(argv, match):
  with pytest.raises(ValueError, match=match):
    ab.resolve_grid(ab.parse_args(["--preset=smoke", *argv]))
