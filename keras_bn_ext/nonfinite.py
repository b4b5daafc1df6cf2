"""Elementwise differences that see NaN and inf: the reductions every verdict is built on.

A candidate (a fold, an export, an INT8 file) agrees with its reference at an element when
both are finite (their difference then counts), or both are NaN, or both are the same
infinity. Anything else is a non-finite mismatch: a NaN or inf where the reference is
finite, a finite value where the reference has NaN or inf, or an inf of the other sign.
A mismatch is counted, never folded into a maximum: Python's `max(0.0, nan)` is 0.0 and
`nan > tol` is False, so a NaN that reaches an ordinary reduction disappears.

numpy only (below everything that compares).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Differences", "differences", "finite_abs_max", "mismatch_mask"]


def mismatch_mask(reference, candidate) -> np.ndarray:
    """True where the two disagree in kind: not (both finite, both NaN, the same inf)."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    both_finite = np.isfinite(ref) & np.isfinite(got)
    same_special = (np.isnan(ref) & np.isnan(got)) | (np.isinf(ref) & (ref == got))
    return ~(both_finite | same_special)


def finite_abs_max(array) -> float:
    """max|x| over the finite elements (0.0 when there are none)."""
    a = np.abs(np.asarray(array, np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


@dataclass(frozen=True)
class Differences:
    """What one reference/candidate pair of arrays differ by."""

    max_abs: float  # max|a-b| over the elements where both are finite
    sum_abs: float  # sum of |a-b| there
    finite_pairs: int  # how many such elements
    mismatches: int  # non-finite mismatches (`mismatch_mask`)
    reference_nonfinite: int  # NaN/inf elements of the reference (matched or not)
    reference_max: float  # max|reference| over its finite elements


def differences(reference, candidate) -> Differences:
    """The NaN-aware differences of two arrays of the same shape."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"shapes differ: {got.shape} against {ref.shape}")
    both = np.isfinite(ref) & np.isfinite(got)
    diff = np.abs(ref[both] - got[both])
    return Differences(
        max_abs=float(diff.max()) if diff.size else 0.0,
        sum_abs=float(diff.sum()),
        finite_pairs=int(diff.size),
        mismatches=int(mismatch_mask(ref, got).sum()),
        reference_nonfinite=int(ref.size - np.count_nonzero(np.isfinite(ref))),
        reference_max=finite_abs_max(ref),
    )


def max_rel_err(reference, got) -> float:
    """max|g - r| / max|r| over paired outputs; inf when NaN/inf appear where they should not
    (or are missing where they should be)."""
    worst = 0.0
    for r, g in zip(reference, got):
        d = differences(r, g)
        if d.mismatches:
            return float("inf")
        worst = max(worst, d.max_abs / (d.reference_max or 1.0))
    return worst
