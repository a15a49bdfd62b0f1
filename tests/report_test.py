"""The report end to end on a tiny configuration, and the scripts' --help."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from gsparse import _theory, report, sweep

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
)


def test_report_writes_everything_with_phase_progress(tmp_path, capsys):
  res = report.build_report(jax.random.key(0), str(tmp_path / "r"), config=_TINY, progress=True)
  # One progress line per phase, in order, each with the seconds since the start.
  lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("report [")]
  assert [ln.split("] ", 1)[1].split(":")[0] for ln in lines] == [
    "1/4 sweep",
    "2/4 bounds",
    "3/4 figures",
    "4/4 summary",
    "done",
  ], lines
  seconds = [float(ln[len("report [") :].split(" s]")[0]) for ln in lines]
  assert seconds == sorted(seconds)
  assert list(res.phase_seconds) == ["sweep", "bounds", "figures", "summary"]
  assert sum(res.phase_seconds.values()) <= res.seconds
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
  assert "Time: sweep " in text and "whole report" in text
  table = sweep.SweepTable.from_csv(res.csv)
  points, part = report.report_points(_TINY)
  assert len(table) == len(part) and table["part"].tolist() == part.tolist()
  np.testing.assert_array_equal(table["k"], points["k"])
  # The certificate check in the summary is computed, and holds.
  assert "at 0 of" in text


def test_measure_puts_each_bound_at_the_points_that_show_it(monkeypatch):
  """Theorem 1 at the sparsity points, Theorem 2 at the error and n^C points, NaN elsewhere.

  The bounds are replaced by functions of each row's own n and k, so the test
  sees which sweep row each value landed on (the real bounds are tested in
  bounds_test.py).
  """
  monkeypatch.setattr(_theory, "sparsity_k", lambda t, delta: np.asarray(t["n"]) + 0.5)
  monkeypatch.setattr(
    _theory, "topk_error", lambda t, delta: (np.asarray(t["k"]) * 10.0, np.asarray(t["n"]) * 0.1)
  )
  table, part = report.measure(jax.random.key(1), _TINY, progress=False)
  one = part == "sparsity"
  two = np.isin(part, ["error", "fixed", "power"])
  assert one.any() and two.any() and (part == "phase").any()
  np.testing.assert_array_equal(table["bound_k"][one], table["n"][one] + 0.5)
  np.testing.assert_array_equal(table["bound_error"][two], table["k"][two] * 10.0)
  np.testing.assert_allclose(table["bound_tail"][two], table["n"][two] * 0.1)
  assert np.isnan(table["bound_k"][~one]).all()
  assert np.isnan(table["bound_error"][~two]).all() and np.isnan(table["bound_tail"][~two]).all()


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


@pytest.mark.parametrize("script", ["report.py", "bench_sweep.py"])
def test_script_help_explains_flags(script, tmp_path):
  """scripts/report.py is a wrapper of `gsparse-report` that needs no PYTHONPATH."""
  env = dict(os.environ)
  if script == "report.py":
    env.pop("PYTHONPATH", None)
  else:
    env["PYTHONPATH"] = str(_ROOT)
  proc = subprocess.run(
    [sys.executable, str(_ROOT / "scripts" / script), "--help"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
  )
  assert proc.returncode in (0, 1), proc.stderr  # absl's --help exits with status 1
  assert "Traceback" not in proc.stderr, proc.stderr
  out = proc.stdout + proc.stderr
  flags = {
    "report.py": ["out", "small", "seed", "trials", "eps", "delta", "progress"],
    "bench_sweep.py": ["points", "trials", "n", "d", "rows", "baseline_points", "json"],
  }[script]
  for f in flags:  # "--name: help" or "--[no]name: help"
    assert f"--{f}:" in out or f"--[no]{f}:" in out, (f, out[:2000])
