"""The structure conversion (kernels as tf2onnx inputs, values attached after) against tf2onnx's
own frozen route, and ONNX external data: same graph, same names, same outputs, both files."""

import collections
import os

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from keras import layers

from keras_bn_ext import BatchNormalization, ExportOptions, OnnxOptions, export_onnx, verify_onnx
from keras_bn_ext.export.onnx import structure
from keras_bn_ext.export.onnx.convert import to_onnx_proto
from keras_bn_ext.folding.fold import fold_batchnorms
from keras_bn_ext.testing import RESIDUAL_GAMMA, application_model, randomize_batchnorms
from tests.helpers import lenet, two_input_dict_model

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf2onnx needs TensorFlow")

# tf2onnx's own export is not deterministic in its Reshape count: three conversions of the same
# folded DenseNet121 in one process gave 32, 31 and 29 Reshapes (its optimizers iterate sets).
# Every other operation must be counted the same.
_UNSTABLE = {"Reshape"}


def _embedding_model():
    ids = keras.Input((6,), dtype="int32", name="ids")
    x = layers.Embedding(5000, 32, name="embed")(ids)  # 160k weights: an input, read by Gather as it is
    x = layers.Conv1D(64, 3, name="conv")(x)
    x = BatchNormalization(name="bn")(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, layers.Dense(10, name="head")(x))


def _normalized_model():
    inputs = keras.Input((16, 16, 3), name="image")
    norm = layers.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 3.0], name="norm")
    x = layers.Conv2D(128, 3, name="conv")(norm(inputs))
    x = BatchNormalization(name="bn")(x)
    x = layers.Flatten()(layers.ReLU()(x))
    return keras.Model(inputs, layers.Dense(300, name="wide_dense")(x))  # 25k x 300 kernel


_MODELS = {
    "lenet": lambda: lenet(BatchNormalization),  # no weight big enough to travel as an input
    "two_inputs_dict_outputs": two_input_dict_model,
    "embedding": _embedding_model,
    "normalization": _normalized_model,
    # keras.applications: depthwise convs with fused biases, and BNs kept after Concatenate.
    "MobileNetV3Small": lambda: application_model("MobileNetV3Small"),
    "DenseNet121": lambda: application_model("DenseNet121"),
}


def _inputs(model, batch=3, seed=0):
    from keras_bn_ext.compare import input_specs

    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in input_specs(model):
        shape = (batch,) + tuple(shape[1:])
        if "int" in str(dtype):
            feeds[name] = rng.integers(0, 5000, size=shape).astype(str(dtype))
        else:
            feeds[name] = rng.normal(size=shape).astype("float32")
    return feeds


def _run(proto, feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("name", list(_MODELS))
def test_structure_conversion_is_the_frozen_graph(name):
    model = _MODELS[name]()
    randomize_batchnorms(model, residual_gamma=RESIDUAL_GAMMA)
    folded, _ = fold_batchnorms(model)
    frozen = to_onnx_proto(folded, conversion="frozen")
    lean = to_onnx_proto(folded, conversion="structure")
    count = lambda p: collections.Counter(n.op_type for n in p.graph.node if n.op_type not in _UNSTABLE)  # noqa: E731
    assert count(lean) == count(frozen)
    assert [i.name for i in lean.graph.input] == [i.name for i in frozen.graph.input]
    assert [o.name for o in lean.graph.output] == [o.name for o in frozen.graph.output]
    # No weight input is left unbound, and the weights are all there.
    assert not any(i.name.startswith(structure.WEIGHT_PREFIX) for i in lean.graph.input)
    size = lambda p: sum(len(t.raw_data) for t in p.graph.initializer)  # noqa: E731
    # The same weights; only small constants may differ (shape tensors, a bias tf2onnx keeps
    # unfused in one route): measured up to 0.2% (EfficientNetB0), so 1% catches a lost kernel.
    assert abs(size(lean) - size(frozen)) <= 0.01 * size(frozen)
    feeds = _inputs(model)
    want, got = _run(frozen, feeds), _run(lean, feeds)
    for key in want:
        # The same operations on the same values: equal up to a kernel's summation order.
        top = float(np.max(np.abs(want[key]))) or 1.0
        assert float(np.max(np.abs(want[key] - got[key]))) <= 1e-6 * top, key


def test_a_failing_structure_conversion_falls_back_to_frozen_and_says_why(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("stateless_call is not available here")

    monkeypatch.setattr(structure, "to_onnx_structure", refuse)
    model = lenet(BatchNormalization)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.conversion == "frozen" and "stateless_call is not available" in report.conversion_fallback
    assert verify_onnx(model, tmp_path / "m.onnx", onnx=OnnxOptions(provider="cpu")).passed


def test_external_data_writes_both_files_and_verifies(tmp_path):
    model = _normalized_model()
    randomize_batchnorms(model)
    out = tmp_path / "wide.onnx"
    report = export_onnx(model, out, onnx=OnnxOptions(external_data=True))
    data = tmp_path / "wide.onnx.data"
    assert report.external_data == str(data) and data.exists()
    assert report.external_data_bytes >= 4 * 25 * 1000 * 300 * 0.99  # the wide kernel, at least
    assert sorted(os.listdir(tmp_path)) == ["wide.onnx", "wide.onnx.data"]  # no temporary left behind
    proto = onnx.load(str(out), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all({e.key for e in t.external_data} >= {"location", "offset", "length"} for t in external)
    assert os.path.getsize(out) < 100_000  # the structure only
    verification = verify_onnx(model, out, onnx=OnnxOptions(provider="cpu"))
    assert verification.passed and verification.comparison.max_rel_err <= 1e-5


def test_export_verified_commits_model_and_data_together(tmp_path):
    from keras_bn_ext.export.driver import export_verified
    from keras_bn_ext.export.onnx.options import OnnxOptions
    from keras_bn_ext.export.onnx.target import OnnxTarget
    from keras_bn_ext.export.options import ExportOptions

    model = _normalized_model()
    out = tmp_path / "m.onnx"
    result = export_verified(model, out, target=OnnxTarget(OnnxOptions(external_data=True, provider="cpu")),
                             options=ExportOptions(samples=1))
    assert result.passed and result.stage.code == "passed"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert result.export.companions == [str(tmp_path / "m.onnx.data")]
    assert result.to_dict()["onnx"]["external_data"] == str(tmp_path / "m.onnx.data")
    assert result.to_dict()["onnx"]["external_data_bytes"] > 0


def test_float16_with_external_data_is_refused(tmp_path):
    from keras_bn_ext.errors import ExportError

    with pytest.raises(ExportError, match="external data"):
        export_onnx(lenet(BatchNormalization), tmp_path / "m.onnx", options=ExportOptions(fp16=True), onnx=OnnxOptions(external_data=True))
    assert os.listdir(tmp_path) == []
