"""keras_bn_ext.nonfinite and every comparison built on it: NaN and inf are never lost.

Property-based (hypothesis): any array, any NaN/inf pattern; the oracle is the definition
itself, element by element in plain Python."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_bn_ext import nonfinite
from keras_bn_ext.compare import _judge, compare_output_lists
from keras_bn_ext.quantization.fidelity import measure

VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0]))
ARRAYS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), elements=VALUES)


def _kind(v: float) -> str:
    return "nan" if math.isnan(v) else ("+inf" if v == math.inf else "-inf" if v == -math.inf else "finite")


@st.composite
def pair(draw):
    ref = draw(ARRAYS)
    got = draw(hnp.arrays(np.float32, ref.shape, elements=VALUES))
    return ref, got


@settings(max_examples=300, deadline=None)
@given(pair())
def test_mismatches_are_exactly_the_elements_of_another_kind(p):
    ref, got = p
    expected = sum(_kind(float(r)) != _kind(float(g)) for r, g in zip(ref.ravel(), got.ravel()))
    d = nonfinite.differences(ref, got)
    assert d.mismatches == expected
    finite = [abs(float(r) - float(g)) for r, g in zip(ref.ravel(), got.ravel())
              if _kind(float(r)) == _kind(float(g)) == "finite"]
    assert d.max_abs == max(finite, default=0.0) and d.finite_pairs == len(finite)
    assert not math.isnan(d.max_abs) and not math.isnan(d.reference_max)


@settings(max_examples=300, deadline=None)
@given(pair())
def test_a_comparison_passes_only_when_every_element_agrees_in_kind(p):
    ref, got = p
    report = compare_output_lists([[ref]], [[got]], ["y"], atol=np.inf, rtol=0.0)  # values not judged
    kinds_agree = all(_kind(float(r)) == _kind(float(g)) for r, g in zip(ref.ravel(), got.ravel()))
    assert report.passed == kinds_agree
    assert report.outputs[0].nonfinite_mismatches == nonfinite.mismatch_mask(ref, got).sum()


@settings(max_examples=200, deadline=None)
@given(ARRAYS)
def test_an_array_agrees_with_itself_nan_and_all(ref):
    report = compare_output_lists([[ref]], [[ref.copy()]], ["y"], atol=0.0, rtol=0.0)
    assert report.passed and report.max_abs_err == 0.0


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, (4, 6), elements=st.floats(-10, 10, width=32)),
       st.integers(0, 23), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_one_non_finite_element_fails_every_verdict(ref, where, bad):
    got = ref.copy()
    got.flat[where] = bad
    assert not compare_output_lists([[ref]], [[got]], ["y"], atol=1e9, rtol=1e9).passed
    # The float64 judgement, however generous its bound.
    check = _judge([ref.astype(np.float64)], [ref], [got], atol=1e9, rtol=1e9, factor=1e9)
    assert not check.passed and check.candidate_nonfinite_mismatches == 1
    # INT8 fidelity: SQNR and top-1 agreement cannot pass it either.
    for name, r, g in (("logits", ref, got), ("score", ref.reshape(-1, 1), got.reshape(-1, 1))):
        fidelity = measure([r], [g], [name])  # a classifier output, then an SQNR-judged one
        assert not fidelity.passed and "nonfinite" in fidelity.outputs[0].failed


def test_the_float64_judgement_refuses_a_twin_that_is_another_function():
    # The case: the twin (a rebuild) lost state, so it agrees with an equally wrong
    # candidate. The float32 original is 0.9 relative from it: not float32 rounding.
    rng = np.random.default_rng(0)
    original = rng.standard_normal((8, 4)).astype(np.float32)
    twin = original.astype(np.float64) * 0.1
    candidate = twin.astype(np.float32)
    check = _judge([twin], [original], [candidate], atol=1e-5, rtol=1e-5, factor=4.0)
    assert not check.passed and check.reference_code == "model_differs" and not check.reference_valid
    # NaN in the twin where the original has none: not the same function either.
    twin_nan = original.astype(np.float64)
    twin_nan[0, 0] = np.nan
    check = _judge([twin_nan], [original], [original], atol=1e-5, rtol=1e-5, factor=4.0)
    assert not check.passed and check.reference_code == "nonfinite"
    # A valid twin (float32 rounding only) still judges.
    check = _judge([original.astype(np.float64)], [original], [original], atol=0.0, rtol=0.0, factor=4.0)
    assert check.passed and check.reference_code == "agrees"
