"""fold_batchnorms on keras.applications models, with randomized BN statistics."""

import keras
import pytest

from keras_bn_ext import compare_models, fold_batchnorms
from keras_bn_ext.testing import count_batchnorms, randomize_batchnorms

pytestmark = pytest.mark.slow

APPS = {
    "ResNet50": (lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)),
    "MobileNetV2": (lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)),
    "InceptionV3": (lambda: keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3), classes=10, classifier_activation=None)),
    "EfficientNetB0": (lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)),
    "MobileNet_a05_dm2": (lambda: keras.applications.MobileNet(weights=None, input_shape=(32, 32, 3), alpha=0.5, depth_multiplier=2, classes=10, classifier_activation=None)),
}


@pytest.mark.parametrize("name", APPS)
def test_application_folds_fully_and_exactly(name):
    model = APPS[name]()
    randomize_batchnorms(model, seed=1)
    folded, report = fold_batchnorms(model)
    # Every BN of these models follows a conv with a linear activation.
    assert report.bn_total == count_batchnorms(model) > 0
    assert report.bn_folded == report.bn_total, report.kept[:3]
    assert count_batchnorms(folded) == 0
    assert report.params_after < report.params_before
    # Folding reorders float32 arithmetic; over ~50-100 layers the error stays
    # at ~1e-6 of the logits' magnitude. The issue's bar is 1e-5.
    cmp = compare_models(model, folded, samples=2, batch_size=4, atol=0.0, rtol=1e-5)
    assert cmp.passed, cmp
    assert cmp.max_rel_err <= 1e-5
    print(name, report.bn_folded, cmp.max_rel_err)
