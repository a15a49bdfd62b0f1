"""The report end to end on a tiny configuration, and the scripts' --help."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from gsparse import report, sweep

_ROOT = pathlib.Path(__file__).resolve().parents[1]

_TINY = report.ReportConfig(
  d=4,
  trials=1,
  rows=8,
  n_main=32,
  taus=(1.0, 3.0),
  error_taus=(1.0,),
  ks=(1, 4),
  k=4,
  phase_ns=(32,),
  phase_taus=(1.0, 3.0),
  fixed_k=2,
  table_trials=1,
  table_ns=(32,),
  table_ds=(4,),
)


def test_report_writes_everything(tmp_path):
  res = report.build_report(jax.random.key(0), str(tmp_path / "r"), config=_TINY, progress=False)
  names = sorted(os.listdir(tmp_path / "r"))
  assert names == sorted(
    [
      "summary.md",
      "sweep.csv",
      "sparsity_vs_tau.png",
      "error_vs_k.png",
      "phase_diagram.png",
      "power_law_vs_fixed.png",
    ]
  )
  for f in res.figures:
    with open(f, "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
  text = pathlib.Path(res.summary).read_text()
  for fig in ("sparsity_vs_tau.png", "error_vs_k.png", "phase_diagram.png"):
    assert f"]({fig})" in text
  assert "| n | d | sigma | eps |" in text  # the legacy table is kept
  table = sweep.SweepTable.from_csv(res.csv)
  points, part = report.report_points(_TINY)
  assert len(table) == len(part) and table["part"].tolist() == part.tolist()
  np.testing.assert_array_equal(table["k"], points["k"])
  # The certificate check in the summary is computed, and holds.
  assert "at 0 of" in text


def test_report_points_cover_every_figure():
  points, part = report.report_points(_TINY)
  assert set(part.tolist()) == {"sparsity", "error", "phase", "fixed", "power"}
  cfg = report.ReportConfig()
  points, part = report.report_points(cfg)
  # The adaptive window grows like n^C; the fixed one does not.
  ns = np.asarray(points["n"])[part == "power"]
  ks = np.asarray(points["k"])[part == "power"]
  np.testing.assert_array_equal(ks, np.ceil(cfg.alpha * ns**cfg.C - 1e-9).astype(int))
  assert np.all(np.asarray(points["k"])[part == "fixed"] == cfg.fixed_k)


@pytest.mark.parametrize("script", ["report.py", "sweep.py", "bench_sweep.py"])
def test_script_help_explains_flags(script):
  proc = subprocess.run(
    [sys.executable, str(_ROOT / "scripts" / script), "--help"],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": str(_ROOT)},
  )
  assert proc.returncode in (0, 1), proc.stderr  # absl's --help exits with status 1
  assert "Traceback" not in proc.stderr, proc.stderr
  out = proc.stdout + proc.stderr
  flags = {
    "report.py": ["out", "small", "seed", "trials", "eps", "delta"],
    "sweep.py": ["n", "d", "sigma", "weight_scale", "k", "eps", "random", "trials", "rows", "out"],
    "bench_sweep.py": ["points", "trials", "n", "d", "rows", "baseline_points", "json"],
  }[script]
  for f in flags:  # "--name: help" or "--[no]name: help"
    assert f"--{f}:" in out or f"--[no]{f}:" in out, (f, out[:2000])
