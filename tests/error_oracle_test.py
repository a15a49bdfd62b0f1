"""scripts/error_oracle.py: its exact conditional tail against plain Monte Carlo."""

import importlib.util
import pathlib

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _oracle():
  spec = importlib.util.spec_from_file_location(
    "error_oracle", _ROOT / "scripts" / "error_oracle.py"
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_conditional_tail_matches_plain_monte_carlo():
  """`P(||a + B h|| > e)`, `h ~ N(0, I_d)`: radius-exact conditional MC against direct sampling.

  Sample sizes: 400,000 direct draws (binomial SE at most 8e-4 at p = 0.5) and 40,000
  directions; tolerance 5 combined SEs at each of three levels, about 1e-6 false failures.
  The three levels cover `||a|| < e` (one root) and `||a|| > e` (an interval of radii).
  """
  mod = _oracle()
  rng = np.random.default_rng(0)
  d, hv = 3, 5
  b = rng.standard_normal((hv, d))
  a = b @ rng.standard_normal(d) + 0.1 * rng.standard_normal(hv)  # near B's range: the
  # line a + r B theta then often passes through the ball ||.|| <= e (two positive roots)
  h = rng.standard_normal((400_000, d))
  direct = np.linalg.norm(a + h @ b.T, axis=1)
  th = rng.standard_normal((40_000, d))
  th /= np.linalg.norm(th, axis=1, keepdims=True)
  bt = th @ b.T
  coef = ((bt * bt).sum(1), bt @ a, np.full(len(th), a @ a))
  for e in (0.5 * np.linalg.norm(a), 1.5 * np.linalg.norm(a), 3.0 * np.linalg.norm(a)):
    p_direct = float(np.mean(direct > e))
    probs = mod._prob(coef, e, d)
    p_cond = float(probs.mean())
    se = np.sqrt(p_direct * (1 - p_direct) / len(direct) + probs.var() / len(probs))
    assert abs(p_cond - p_direct) <= 5 * se + 1e-12, (e, p_cond, p_direct, se)
