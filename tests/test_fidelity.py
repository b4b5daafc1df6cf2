"""INT8 fidelity metrics against numpy written out by hand, and the label checks."""

import math

import numpy as np
import pytest

from keras_bn_ext.errors import InputDataError
from keras_bn_ext.quantization.fidelity import Criteria, check_labels, measure


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 10))
    got = ref + rng.normal(scale=0.1, size=ref.shape)
    labels = np.argmax(ref, axis=1)
    labels[:5] = (labels[:5] + 1) % 10  # the float model is wrong on five
    report = measure([ref], [got], ["probs"], labels=labels)
    o = report.outputs[0]
    assert o.classifier
    assert math.isclose(o.sqnr_db, 10 * np.log10(np.sum(ref ** 2) / np.sum((got - ref) ** 2)), abs_tol=1e-3)
    assert math.isclose(o.max_rel_err, np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert math.isclose(o.mean_rel_err, np.mean(np.abs(got - ref)) / np.mean(np.abs(ref)))
    assert o.top1_agreement == np.mean(np.argmax(got, 1) == np.argmax(ref, 1))
    assert o.accuracy_float == 0.95
    assert math.isclose(o.accuracy_drop_pt, 100 * (0.95 - np.mean(np.argmax(got, 1) == labels)), abs_tol=1e-3)


def test_criteria_name_what_failed():
    ref = np.eye(4)[np.arange(8) % 4] + 0.01
    got = np.eye(4)[(np.arange(8) + 1) % 4]  # every top-1 differs
    feature_ref, feature_got = np.ones((8, 3, 3)), np.ones((8, 3, 3)) * 1.5
    report = measure([ref, feature_ref], [got, feature_got], ["cls", "map"], labels=np.arange(8) % 4)
    assert report.outputs[0].failed == ["top1_agreement", "accuracy_drop"]
    assert report.outputs[1].failed == ["sqnr"] and not report.outputs[1].classifier
    assert not report.passed
    off = Criteria(min_top1_agreement=None, max_accuracy_drop=None, min_sqnr_db=None)
    assert measure([ref, feature_ref], [got, feature_got], ["cls", "map"], criteria=off).passed


@pytest.mark.parametrize("labels,match", [
    (np.zeros(7, "int64"), r"\(7,\) values; one class id per sample \(8\)"),
    (np.full(8, 0.5), "integer class ids"),
    (np.array(["a"] * 8), "integer class ids"),
    (np.full(8, 10), "class ids from 10 to 10; the classifier output has 10 classes"),
    (np.full(8, -1), "class ids from -1"),
])
def test_bad_labels(labels, match):
    with pytest.raises(InputDataError, match=match):
        check_labels(labels, 8, 10)


def test_float_labels_that_are_whole_numbers_and_column_vectors_are_accepted():
    assert check_labels(np.arange(8, dtype="float32").reshape(8, 1), 8, 10).dtype == np.int64
