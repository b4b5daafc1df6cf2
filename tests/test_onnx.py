"""export_onnx and verify_onnx: names, batch dimension, folding, and real onnxruntime runs."""

import keras
import numpy as np
import onnx
import pytest
from keras import layers

from keras_bn_ext import BatchNormalization, ExportOptions, OnnxOptions, export_onnx, verify_onnx
from keras_bn_ext.errors import ExportError
from keras_bn_ext.testing import randomize_batchnorms
from tests.helpers import two_input_dict_model

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf2onnx needs TensorFlow")


@pytest.fixture
def lenet():
    from tests.helpers import lenet as build

    model = build(BatchNormalization)
    randomize_batchnorms(model)
    return model


def _graph(path):
    return onnx.load(str(path)).graph


def _affine_after_conv(graph):
    """What an unfolded BN leaves behind: a Mul by a constant on a Conv or MatMul output,
    or an Add of a constant on a Conv output. (A constant Add after a MatMul is a Dense
    layer's own bias; an Add of two tensors is a residual connection.)"""
    producer = {out: node for node in graph.node for out in node.output}
    constants = {i.name for i in graph.initializer}

    def affine(node, ops):
        fed = any(producer.get(i) is not None and producer[i].op_type in ops for i in node.input)
        return fed and any(i in constants for i in node.input)

    return [
        node.name for node in graph.node
        if (node.op_type == "Mul" and affine(node, ("Conv", "MatMul")))
        or (node.op_type == "Add" and affine(node, ("Conv",)))
    ]


def test_lenet_export_names_batch_dim_and_no_bn_ops(lenet, tmp_path):
    path = tmp_path / "lenet.onnx"
    report = export_onnx(lenet, path)
    graph = _graph(path)
    assert [i.name for i in graph.input] == ["input_layer"]
    assert [o.name for o in graph.output] == ["dense_2"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert report.bn_folded == 4
    # Fully folded: no BatchNormalization op, no Mul at all, no Add after a Conv (conv
    # biases live in the Conv node; the Adds left are the Dense layers' MatMul biases).
    assert "BatchNormalization" not in report.op_counts and "Mul" not in report.op_counts
    assert _affine_after_conv(graph) == []
    assert report.op_counts["Conv"] == 2
    result = verify_onnx(lenet, path, onnx=OnnxOptions(provider="cpu"))
    assert result.passed and result.provider == "CPUExecutionProvider"
    assert result.batch_sizes == [1, 8]
    assert result.comparison.max_rel_err <= 1e-5


def test_no_fold_export_is_correct_with_our_layer(lenet, tmp_path):
    path = tmp_path / "nofold.onnx"
    report = export_onnx(lenet, path, options=ExportOptions(fold=False))
    assert report.fold is None and report.bn_folded == 0
    # Unfolded, tf2onnx merges our conv BNs into the Conv itself but leaves the two
    # dense BNs as Mul + Add after their MatMul.
    assert len(_affine_after_conv(_graph(path))) == 2
    assert verify_onnx(lenet, path, onnx=OnnxOptions(provider="cpu")).passed


def test_two_inputs_and_dict_outputs(tmp_path):
    model = two_input_dict_model()
    path = tmp_path / "multi.onnx"
    report = export_onnx(model, path)
    graph = _graph(path)
    assert [i.name for i in graph.input] == ["image", "meta"]
    assert [o.name for o in graph.output] == ["class_logits", "score"]  # Keras's flattened order
    assert report.bn_folded == 2
    for value in list(graph.input) + list(graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    result = verify_onnx(model, path, onnx=OnnxOptions(provider="cpu"))
    assert result.passed, result.comparison
    assert [o.name for o in result.comparison.outputs] == ["class_logits", "score"]


def test_fixed_batch_size(tmp_path, lenet):
    path = tmp_path / "b1.onnx"
    export_onnx(lenet, path, options=ExportOptions(batch_size=1))
    assert _graph(path).input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert verify_onnx(lenet, path, options=ExportOptions(batch_size=1), onnx=OnnxOptions(provider="cpu")).passed


def test_real_inputs(tmp_path, lenet):
    path = tmp_path / "l.onnx"
    export_onnx(lenet, path)
    x = np.random.default_rng(5).uniform(0, 1, (16, 28, 28, 1)).astype("float32")
    result = verify_onnx(lenet, path, options=ExportOptions(inputs=[x]), onnx=OnnxOptions(provider="cpu"))
    assert result.passed and result.batch_sizes == [16]


def test_corrupted_weight_fails_verification(lenet, tmp_path):
    path = tmp_path / "lenet.onnx"
    export_onnx(lenet, path)
    proto = onnx.load(str(path))
    conv_weight = next(n for n in proto.graph.node if n.op_type == "Conv").input[1]
    init = next(i for i in proto.graph.initializer if i.name == conv_weight)
    array = onnx.numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5  # one weight of the first conv
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    onnx.save(proto, str(path))
    result = verify_onnx(lenet, path, onnx=OnnxOptions(provider="cpu"))
    assert not result.passed
    assert result.comparison.max_abs_err > 1e-4


def test_auto_provider_reports_what_ran(lenet, tmp_path):
    path = tmp_path / "l.onnx"
    export_onnx(lenet, path)
    result = verify_onnx(lenet, path, onnx=OnnxOptions(provider="auto"))
    assert result.passed
    if result.provider == "CPUExecutionProvider":
        # Never a silent fallback: one line, onnxruntime's own specific reason (with a
        # GPU build and no CUDA libraries, the library that failed to load).
        reason = result.fallback_reason
        assert reason.startswith("CUDA could not be used") and "\n" not in reason and "\x1b" not in reason
        if "CUDAExecutionProvider" in result.to_dict().get("available", ["CUDAExecutionProvider"]):
            assert "Node placements" not in reason and "[V:" not in reason
        assert result.placement is None
    else:
        assert result.provider == "CUDAExecutionProvider" and result.fallback_reason is None


@pytest.mark.parametrize("opset", [12, 19])
def test_opset_out_of_range(lenet, tmp_path, opset):
    with pytest.raises(ValueError, match=f"Received: opset={opset}"):
        export_onnx(lenet, tmp_path / "x.onnx", onnx=OnnxOptions(opset=opset))
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_mobilenetv2_randomized_bn(tmp_path):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10,
                                           classifier_activation=None)
    randomize_batchnorms(model, seed=2)
    path = tmp_path / "mnv2.onnx"
    report = export_onnx(model, path)
    assert report.bn_folded == 52 and "BatchNormalization" not in report.op_counts
    assert _affine_after_conv(_graph(path)) == []
    result = verify_onnx(model, path, options=ExportOptions(samples=1), onnx=OnnxOptions(provider="cpu"))
    assert result.passed, result.comparison


def test_fp16_export_keeps_float32_io_and_passes_fp16_tolerance(lenet, tmp_path):
    path = tmp_path / "l16.onnx"
    report = export_onnx(lenet, path, options=ExportOptions(fp16=True))
    assert report.fp16
    proto = onnx.load(str(path))
    f16 = onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(i.data_type == f16 for i in proto.graph.initializer if i.data_type in (f16, onnx.TensorProto.FLOAT))
    # float16 rounding (unit roundoff 4.9e-4) in every layer: measured ~8e-5 relative here;
    # the fp16 tolerance is 1e-2 relative, and float32's 1e-5 must fail.
    assert verify_onnx(lenet, path, options=ExportOptions(atol=1e-3, rtol=1e-2), onnx=OnnxOptions(provider="cpu")).passed
    assert not verify_onnx(lenet, path, options=ExportOptions(atol=0.0, rtol=1e-6), onnx=OnnxOptions(provider="cpu")).passed
    # Called without tolerances, verify_onnx reads the file's precision: float16's defaults.
    default = verify_onnx(lenet, path, options=ExportOptions(samples=1), onnx=OnnxOptions(provider="cpu"))
    assert default.passed and default.comparison.rtol == 1e-2 and default.comparison.atol == 1e-3


GROUPED = {
    "conv2d_groups_2": ((8, 8, 4), lambda: layers.Conv2D(6, 3, groups=2)),
    "conv2d_groups_4_same_strided": ((9, 9, 8), lambda: layers.Conv2D(8, 3, groups=4, padding="same", strides=2)),
    "conv1d_groups_2_causal": ((10, 4), lambda: layers.Conv1D(6, 3, groups=2, padding="causal")),
    "conv3d_groups_2": ((5, 5, 5, 4), lambda: layers.Conv3D(4, 2, groups=2)),
}


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "no_fold"])
@pytest.mark.parametrize("name", GROUPED)
def test_grouped_convolutions_export(name, fold, tmp_path):
    # Keras runs grouped convs through an XLA tf.function that tf2onnx cannot convert;
    # the export traces them as plain convolutions (ONNX Conv with group, or one per group).
    shape, make = GROUPED[name]
    inputs = keras.Input(shape)
    model = keras.Model(inputs, layers.ReLU()(layers.BatchNormalization()(make()(inputs))))
    randomize_batchnorms(model)
    report = export_onnx(model, tmp_path / "g.onnx", options=ExportOptions(fold=fold))
    assert report.op_counts.get("Conv", 0) >= 1
    assert verify_onnx(model, tmp_path / "g.onnx", onnx=OnnxOptions(provider="cpu")).passed


def test_a_layer_tf2onnx_cannot_convert_is_named(tmp_path):
    import tensorflow as tf

    class XlaScale(layers.Layer):
        def call(self, x):
            @tf.function(jit_compile=True)
            def scale(y):
                return y * 2.0

            return scale(x)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, layers.Dense(3)(XlaScale(name="xla_scale")(layers.Dense(4)(inputs))))
    with pytest.raises(ExportError, match=r"unconverted in layer 'xla_scale' \(XlaScale\): PartitionedCall"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def _pad_into_maxpool_model():
    # ZeroPadding2D -> MaxPooling2D on negative values (ResNet50V2's stem): onnxruntime's
    # Pad_Fusion moves the zero Pad into the MaxPool, which pads with -inf, so border
    # windows change from 0 to their (negative) maximum.
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, bias_initializer=keras.initializers.Constant(-10.0))(inputs)
    x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1)(x))
    return keras.Model(inputs, layers.Flatten()(x))


def test_onnxruntime_optimizer_error_is_told_apart_from_a_wrong_graph(tmp_path):
    # tf2onnx's graph as it comes, without export_onnx's guard: the graph is right and
    # a default onnxruntime session is not; the report must say so.
    from keras_bn_ext.export.onnx.convert import to_onnx_proto

    model = _pad_into_maxpool_model()
    onnx.save_model(to_onnx_proto(model), str(tmp_path / "p.onnx"))
    result = verify_onnx(model, tmp_path / "p.onnx", onnx=OnnxOptions(provider="cpu"))
    if result.passed:
        pytest.skip("this onnxruntime no longer fuses a zero Pad into MaxPool")
    assert result.unoptimized.passed and result.optimizer_culprit == "Pad_Fusion"
    assert "disabled_optimizers=['Pad_Fusion']" in result.diagnosis
    assert result.to_dict()["unoptimized_max_rel_err"] <= 1e-6


@pytest.mark.parametrize("opset,fp16", [(13, False), (17, False), (17, True), (18, False)])
def test_exported_zero_pad_before_maxpool_survives_onnxruntime_optimizer(tmp_path, opset, fp16):
    model = _pad_into_maxpool_model()
    report = export_onnx(model, tmp_path / "p.onnx", options=ExportOptions(fold=False, fp16=fp16), onnx=OnnxOptions(opset=opset))
    assert len(report.guards) == 1 and "MaxPool" in report.guards[0]
    (pad,) = [n for n in _graph(tmp_path / "p.onnx").node if n.op_type == "Pad"]
    assert len(pad.input) == (4 if opset >= 18 else 3)  # explicit -0.0, and axes from 18
    # The default session (all graph optimizations on) now agrees with Keras.
    tolerances = ExportOptions(atol=1e-3, rtol=1e-2) if fp16 else None
    result = verify_onnx(model, tmp_path / "p.onnx", options=tolerances, onnx=OnnxOptions(provider="cpu"))
    assert result.passed and result.unoptimized is None


def test_pad_guard_leaves_pads_it_need_not_touch(tmp_path):
    # A zero Pad into a Conv fuses correctly (Conv pads with zeros); a Pad of another
    # value is never fused. Neither is changed.
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3)(layers.ZeroPadding2D(1)(inputs))
    x = keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-5.0)
    model = keras.Model(inputs, layers.MaxPooling2D(2)(x))
    assert export_onnx(model, tmp_path / "q.onnx", options=ExportOptions(fold=False)).guards == []
    assert verify_onnx(model, tmp_path / "q.onnx", onnx=OnnxOptions(provider="cpu")).passed


def test_renorm_bn_exports_unfolded_and_folded(tmp_path):
    inputs = keras.Input((6, 6, 3))
    bn = BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0}, momentum=0.5)
    model = keras.Model(inputs, layers.ReLU()(bn(layers.Conv2D(4, 3)(inputs))))
    randomize_batchnorms(model)
    for fold in (False, True):
        export_onnx(model, tmp_path / f"r{fold}.onnx", options=ExportOptions(fold=fold))
        assert verify_onnx(model, tmp_path / f"r{fold}.onnx", onnx=OnnxOptions(provider="cpu")).passed
