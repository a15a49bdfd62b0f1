"""How many keys each query keeps: static k policies for top-k attention.

A policy turns the key length `n` (static under `jit`) into the number of
key slots, so every shape stays static:

* `FixedK(k)`: `min(k, n)` keys.
* `PowerLawK(alpha, c)`: `round(alpha * n**c)` keys clipped to `[1, n]`, the
  revision's adaptive window `k = alpha n^C` (0 < C < 1): the kept fraction
  shrinks as the context grows.
* `CertifiedK(ks, tol)`: the smallest `k` from a static set whose
  a-posteriori tail-mass certificate is at most `tol`, chosen per query (or
  once per call). The largest candidate is selected once; slots beyond the
  chosen `k` are masked.
"""

from __future__ import annotations

import dataclasses

from gsparse import _checks

GRANULARITIES = ("query", "call")


@dataclasses.dataclass(frozen=True)
class FixedK:
  """Keep `min(k, n)` keys per query.

  Attributes:
    k: number of keys, an int >= 1.
  """

  k: int

  def __post_init__(self):
    _checks.check_int("k", self.k, minimum=1)

  def num_keys(self, n: int) -> int:
    """Number of key slots for key length `n`."""
    return min(self.k, n)


@dataclasses.dataclass(frozen=True)
class PowerLawK:
  """Keep `k = alpha * n**C` keys, rounded and clipped to `[1, n]`.

  Attributes:
    alpha: positive prefactor.
    C: exponent in `[0, 1]` (the `C` of the n^C view, docs/theory.md section 6,
      spelled as in `gsparse.bounds.power_law_k`); n^C-sparsity has 0 < C < 1.

  Example:
    >>> from gsparse.flax import PowerLawK
    >>> PowerLawK(alpha=2.0, C=0.5).num_keys(1024)
    64
  """

  alpha: float
  C: float  # the exponent's name in the theory and in gsparse.bounds.power_law_k

  def __post_init__(self):
    _checks.check_float_scalar("alpha", self.alpha, positive=True, allow_traced=False)
    _checks.check_real("C", self.C, lo=0, hi=1, allow_traced=False)

  def num_keys(self, n: int) -> int:
    """Number of key slots for key length `n`."""
    k = int(round(float(self.alpha) * float(n) ** float(self.C)))
    return max(1, min(k, n))


@dataclasses.dataclass(frozen=True)
class CertifiedK:
  """Smallest `k` in `ks` whose certified tail mass is at most `tol`.

  The top-`max(ks)` keys are selected once (static shape). For each candidate
  `k` the softmax mass outside that query's `k` heaviest selected keys is
  bounded by

      t_k <= 1 - (W_k / W) (1 - t_max),

  with `W_k / W` the share of the selected mass held by the `k` heaviest
  selected keys (computed exactly) and `t_max` the certificate of the whole
  selection (`TopKStats.tail_mass_bound`, see `gsparse.certificate`). The
  bound is valid for any selection whose `t_max` is, and never looser than the
  certificate of the top-k itself.

  Proof sketch: let `S` be the exp-mass of the selected keys, `H_k` that of
  the `k` heaviest of them and `X` the mass outside the selection. The
  dropped mass is `(S - H_k + X) / (S + X)`, increasing in `X`, and
  `t_max >= X / (S + X)` gives `X <= S t_max / (1 - t_max)`; substituting
  yields `1 - (H_k / S)(1 - t_max)`. For an exact top-`K` selection with
  `t_max` the certificate `(m-K) e^{s_(K+1)} / (S + (m-K) e^{s_(K+1)})`, the
  bound is `1 - H_k / (S + (m-K) e^{s_(K+1)})`, at most the top-k
  certificate `1 - H_k / (H_k + (m-k) e^{s_(k+1)})` since
  `S - H_k <= (K-k) e^{s_(k+1)}`. Slots beyond the chosen `k` are masked and
  the softmax is renormalised over the rest. When no candidate meets `tol`,
  the largest is used (its bound is then above `tol`).

  Attributes:
    ks: candidate key counts (ints >= 1; sorted and de-duplicated, each
      clipped to the key length at call time).
    tol: tolerance on the certified tail mass, in (0, 1).
    granularity: "query" picks `k` per query and head; "call" picks one `k`
      for the whole call (the largest of the per-query choices, so every
      query meets `tol` whenever any candidate can). Under `jax.vmap` a
      "call" is one mapped instance.

  Example:
    >>> from gsparse.flax import CertifiedK
    >>> CertifiedK(ks=(32, 8, 16), tol=0.01).candidates(20)
    (8, 16, 20)
  """

  ks: tuple[int, ...]
  tol: float
  granularity: str = "query"

  def __post_init__(self):
    ks = self.ks
    if isinstance(ks, int) or not hasattr(ks, "__iter__"):
      raise TypeError(f"ks must be a sequence of ints, got {ks!r}")
    ks = tuple(_checks.check_int("ks entry", k, minimum=1) for k in ks)
    if not ks:
      raise ValueError(f"ks={self.ks!r} must not be empty")
    object.__setattr__(self, "ks", tuple(sorted(set(ks))))
    _checks.check_float_scalar("tol", self.tol, open_unit=True, allow_traced=False)
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity={self.granularity!r} must be one of {GRANULARITIES}")

  def candidates(self, n: int) -> tuple[int, ...]:
    """The candidate key counts for key length `n`, clipped and sorted."""
    return tuple(sorted({min(k, n) for k in self.ks}))

  def num_keys(self, n: int) -> int:
    """Number of key slots (the largest candidate) for key length `n`."""
    return self.candidates(n)[-1]


KPolicy = FixedK | PowerLawK | CertifiedK


def as_policy(k) -> KPolicy:
  """`k` as a policy: an int becomes `FixedK(k)`; a policy is returned as is."""
  if isinstance(k, (FixedK, PowerLawK, CertifiedK)):
    return k
  _checks.check_int("k", k, minimum=1)
  return FixedK(int(k))
