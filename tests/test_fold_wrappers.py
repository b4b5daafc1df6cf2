"""Folding through TimeDistributed (speech, OCR and video models): the wrapped layer's rule,
shifted one axis, and TimeDistributed(BatchNormalization) as a per-frame BN. Each model is
folded, written and reloaded in a fresh process without keras_bn_ext, exported to ONNX
and verified against the unfolded original."""

import keras
import numpy as np
import pytest
from keras import layers

from keras_bn_ext import OnnxOptions, export_onnx, fold_batchnorms, verify_onnx
from keras_bn_ext.folding.save import fold_to_file
from keras_bn_ext.testing import randomize_batchnorms, wrapper_models
from tests.helpers import assert_close, run_python

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exports with tf2onnx")


def crnn():
    """Conv2D+BN -> ReLU -> columns as time steps -> BiLSTM -> TimeDistributed(Dense) -> BN."""
    inputs = keras.Input((16, 32, 1), name="line")
    h = layers.ReLU()(layers.BatchNormalization(name="bn1")(layers.Conv2D(8, 3, padding="same", name="c1")(inputs)))
    h = layers.MaxPooling2D((2, 2))(h)
    h = layers.Reshape((16, 8 * 8))(layers.Permute((2, 1, 3))(h))
    h = layers.Bidirectional(layers.LSTM(10, return_sequences=True), name="bilstm")(h)
    h = layers.BatchNormalization(name="bn_td")(layers.TimeDistributed(layers.Dense(12), name="td")(h))
    return keras.Model(inputs, layers.Dense(5, name="chars")(layers.ReLU()(h)))


WRAPPED = wrapper_models()


MODELS = {
    "deepspeech": (WRAPPED["DeepSpeech-like (GRU, TimeDistributed(Dense))"], {"bn_conv": "conv", "bn_gru": "td_dense", "bn_td": "td_dense"}),
    "crnn": (crnn, {"bn1": "c1", "bn_td": "td"}),
    "video": (WRAPPED["Video (TimeDistributed(Conv2D), BN)"], {"bn1": "td_c1", "bn2": "td_c2"}),
    "video_wrapped_bn": (WRAPPED["Video (TimeDistributed(Conv2D), TimeDistributed(BN))"], {"bn1": "td_c1", "td_bn2": "td_c2"}),
}


@pytest.mark.parametrize("name", MODELS)
def test_wrapped_models_fold_every_bn_reload_without_the_package_and_export(name, tmp_path):
    build, expected = MODELS[name]
    model = build()
    randomize_batchnorms(model)
    result = fold_to_file(model, tmp_path / "folded.keras")
    assert result.passed, result.to_dict()
    report = result.fold
    assert {f.bn: f.into for f in report.folded} == expected and not report.kept
    assert report.bn_folded == report.bn_total == len(expected) and not report.unused
    if name == "deepspeech":  # the BN after the GRU folds forward into the TimeDistributed(Dense)
        assert {f.bn: f.direction for f in report.folded}["bn_gru"] == "forward"
    # Folding reorders float32 arithmetic: 1e-5 of the output's magnitude (folding/options.py).
    x = np.random.default_rng(0).normal(size=(3,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(model(x)))
    out = run_python(f"""
        import keras, numpy as np, sys
        m = keras.saving.load_model({str(tmp_path / 'folded.keras')!r})
        assert "keras_bn_ext" not in sys.modules
        assert not any(isinstance(getattr(l, "layer", l), keras.layers.BatchNormalization) for l in m.layers)
        y = keras.ops.convert_to_numpy(m(np.load({str(tmp_path / 'x.npy')!r})))
        ref = np.load({str(tmp_path / 'y.npy')!r})
        print(float(np.max(np.abs(y - ref)) / max(1.0, np.max(np.abs(ref)))))
    """)
    assert float(out.strip().splitlines()[-1]) <= 1e-5
    export = export_onnx(model, tmp_path / "m.onnx")
    assert export.bn_folded == len(expected) and "BatchNormalization" not in export.op_counts
    assert verify_onnx(model, tmp_path / "m.onnx", onnx=OnnxOptions(provider="cpu")).passed


def test_kept_wrapped_cases_keep_a_reason():
    """A BN after the GRU that feeds an activation stays (tanh output, nothing linear to
    fold into); a TimeDistributed(Dense) with an activation takes no backward fold."""
    inputs = keras.Input((10, 6))
    h = layers.ReLU()(layers.BatchNormalization(name="after_gru")(layers.GRU(4, return_sequences=True)(inputs)))
    h = layers.TimeDistributed(layers.Dense(5, activation="relu"), name="td_relu")(h)
    model = keras.Model(inputs, layers.BatchNormalization(name="after_td_relu")(h))
    randomize_batchnorms(model)
    _, report = fold_batchnorms(model)
    reasons = {k.bn: k.reason for k in report.kept}
    assert "'gru' (GRU), not a conv/dense layer" in reasons["after_gru"]
    assert "'td_relu' (TimeDistributed(Dense)) has activation 'relu'" in reasons["after_td_relu"]


def test_forward_fold_into_a_wrapped_padded_conv_is_refused():
    inputs = keras.Input((3, 8, 8, 2))
    h = layers.BatchNormalization(name="bn")(layers.ReLU()(inputs))
    model = keras.Model(inputs, layers.TimeDistributed(layers.Conv2D(4, 3, padding="same"), name="td")(h))
    randomize_batchnorms(model)
    _, report = fold_batchnorms(model)
    assert "'td' (TimeDistributed(Conv2D)) pads its input" in report.kept[0].reason


def test_recalibration_pools_every_frame_of_a_wrapped_bn():
    from keras_bn_ext.recalibration import recalibrate_batchnorms

    model = WRAPPED["Video (TimeDistributed(Conv2D), TimeDistributed(BN))"]()
    randomize_batchnorms(model)
    x = np.random.default_rng(1).normal(size=(6, 4, 12, 12, 3)).astype("float32")
    report = recalibrate_batchnorms(model, x, batch_size=4)
    td_bn2 = model.get_layer("td_bn2")
    assert {b.bn: b.calls for b in report.batchnorms}["td_bn2/bn2"] >= 1
    h = model.get_layer("td_c2")(layers.ReLU()(model.get_layer("bn1")(model.get_layer("td_c1")(x))))
    h = np.asarray(keras.ops.convert_to_numpy(h), np.float64)
    assert_close(td_bn2.layer.moving_variance, h.reshape(-1, h.shape[-1]).var(0), what="per-frame pooled variance")
