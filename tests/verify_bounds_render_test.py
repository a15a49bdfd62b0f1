"""The Theorem 2V columns and summary rows of gsparse-verify-bounds' Markdown (no Monte Carlo)."""

from __future__ import annotations

from gsparse.cli import _verify_bounds_render as render


def _row(**extra):
  row = dict(
    d=16, n=256, tau_target=1.0, rows=256, k_bound=40.0, informative=True, k_empirical_max=20,
    k_ratio=2.0, violations_k=0, ks=[8], error_bound=[20.0], error_empirical_max=[4.0],
    error_ratio=[5.0], tail_bound=[0.9], tail_empirical_max=[0.6], cert_tail_max_slack=1.5,
    violations_error=[0], cert_violations=0, median_log_ess=5.0,
    predicted_log_ess_at_median_tau=5.0, value_norm_bound=10.0, value_norm_empirical_max=7.0,
    tau_lo_bound=0.3, tau_hi_bound=2.5, tau_row_min=0.5, tau_row_max=2.0, k_trivial=99.0,
  )  # fmt: skip
  row.update(extra)
  return row


def _res(rows):
  summary = dict(violations_k=0, violations_error=0, violations_tail=0, cert_violations=0)
  return dict(rows=rows, summary=summary)


def test_theorem_2v_figures_from_the_json():
  rows = [
    _row(error_ratio_2v=[4.0], error_bound_2v=[16.0], violations_error_2v=[0],
         split_2v=[[1.0, 2.0, 1.0]]),
    _row(error_ratio=[10.0], error_ratio_2v=[8.0], error_bound_2v=[32.0],
         violations_error_2v=[1], split_2v=[[0.0, 1.0, 3.0]]),
  ]  # fmt: skip
  res = _res(rows)
  res["summary"]["violations_error_2v"] = 1
  fig = render.summary_figures(res)
  # Ratios 4 and 8; Theorem 2 / 2V = 5/4 and 10/8; shares (0.25, 0.5, 0.25) and (0, 0.25, 0.75).
  assert fig["Theorem 2V error ratio (min/median/max)"] == "4 / 6 / 8"
  assert fig["Theorem 2 / Theorem 2V (min/median/max)"] == "1.25 / 1.25 / 1.25"
  assert fig["Theorem 2V split, share of Gaussian term (min/median/max)"] == "0.25 / 0.5 / 0.75"
  assert fig["violations, Theorem 2V error"] == "1"
  line = render.fmt_row(rows[1])
  assert "| 32 | 8 |" in line and "| 0 / 1 |" in line


def test_older_json_without_theorem_2v_renders():
  fig = render.summary_figures(_res([_row()]))
  assert not any("2V" in name for name in fig)
  assert "| - | - |" in render.fmt_row(_row())


def test_committed_page_is_the_render_of_the_committed_json():
  """docs/bounds_verification.md is `render.markdown` of docs/bounds_verification.json and of
  the "before" JSON its recorded command names (which must then be committed too): every
  number of the page comes from the JSON, none is typed or left from an older run."""
  import json
  import pathlib
  import re

  root = pathlib.Path(__file__).resolve().parent.parent
  res = json.loads((root / "docs/bounds_verification.json").read_text())
  m = re.search(r"--before=(\S+)", res["summary"]["command"])
  before = None
  if m:
    path = root / m.group(1)
    assert path.is_file(), f"the run's --before JSON {m.group(1)} is not in the repository"
    before = json.loads(path.read_text())
  page = (root / "docs/bounds_verification.md").read_text()
  assert render.markdown(res, before) == page
