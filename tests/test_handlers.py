"""keras_bn_ext.export.onnx.handlers: each tf2onnx handler against TensorFlow itself, on the
values where a naive formula goes wrong (the oracle is TensorFlow's kernel, element by element)."""

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf2onnx needs TensorFlow")


def _convert_and_run(tmp_path, fn, x, *, opset=17, float64_oracle=False):
    """fn traced as a tf.function, converted by tf2onnx with the handlers registered, run on
    onnxruntime (CPU, in the project's child process); returns (TensorFlow, onnxruntime).
    `float64_oracle`: TensorFlow's value is its float64 kernel's (where its float32 one is
    the less accurate of the two)."""
    import tensorflow as tf
    import tf2onnx

    from keras_bn_ext.export.onnx import handlers
    from keras_bn_ext.export.onnx.verify import run_onnxruntime

    handlers.register()
    spec = [tf.TensorSpec((None,) + x.shape[1:], tf.as_dtype(x.dtype), name="x")]
    function = tf.function(lambda t: {"y": fn(t)}, input_signature=spec, autograph=False)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    path = tmp_path / "op.onnx"
    path.write_bytes(proto.SerializeToString())
    got, _ = run_onnxruntime(path, [{"x": x}], provider="cpu")
    ref = fn(tf.constant(x.astype(np.float64))) if float64_oracle else function(tf.constant(x))["y"]
    return np.asarray(ref), got[0][0], proto


def _elementwise_rel(ref, got):
    """Relative error element by element where TensorFlow's value is finite and nonzero;
    NaN/inf must sit at the same places, as the same kind."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    special = ~np.isfinite(ref)
    np.testing.assert_array_equal(np.isnan(got[special]), np.isnan(ref[special]))
    np.testing.assert_array_equal(got[special & ~np.isnan(ref)], ref[special & ~np.isnan(ref)])
    assert np.all(np.isfinite(got[~special])), "a NaN/inf where TensorFlow has a finite value"
    keep = ~special & (ref != 0)
    return np.abs(got[keep] - ref[keep]) / np.abs(ref[keep])


EDGES = np.array([[0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 6.0,
                   -6.0, 9.0, -9.0, 20.0, -20.0, 88.0, -88.0, 100.0, np.inf, -np.inf, np.nan]], np.float32)


@pytest.mark.parametrize("name, fn, x, rtol, float64_oracle", [
    # erfc: relative accuracy kept for large |x| (1 - erf(x) is 0 from x ~ 4 on, in float32).
    # The Chebyshev fit errs < 1.2e-7; float32 evaluation adds a few ulp: 1e-6.
    ("erfc", lambda t: __import__("tensorflow").math.erfc(t), EDGES, 1e-6, False),
    # expm1/log1p near 0: exp(x) - 1 errs by 19% at 1e-7, Kahan's forms by a few ulp.
    ("expm1", lambda t: __import__("tensorflow").math.expm1(t), EDGES, 1e-6, False),
    ("log1p", lambda t: __import__("tensorflow").math.log1p(t),
     np.array([[0.0, -0.0, 1e-30, 1e-7, -1e-7, 1e-3, -0.5, -0.999, -1.0, -2.0, 1.0, 1e5, 1e30, np.inf, np.nan]],
              np.float32), 1e-6, False),
    # erfinv: Giles' single-precision fit (~1e-6 relative at worst, near the ends). TensorFlow's
    # float32 kernel computes ndtri((x + 1) / 2), which loses 5% at |x| = 1e-6 (x + 1 rounds):
    # the oracle is its float64 kernel.
    ("erfinv", lambda t: __import__("tensorflow").math.erfinv(t),
     np.array([[0.0, 1e-6, -1e-6, 0.1, -0.3, 0.5, 0.9, -0.99, 0.999, 0.99999, 1.0, -1.0, 1.5, np.nan]],
              np.float32), 5e-6, True),
])
def test_elementwise_handlers_match_tensorflow_on_edge_values(tmp_path, name, fn, x, rtol, float64_oracle):
    ref, got, proto = _convert_and_run(tmp_path, fn, x, float64_oracle=float64_oracle)
    assert not {n.op_type for n in proto.graph.node} & {"Erfc", "Expm1", "Log1p", "Erfinv"}
    rel = _elementwise_rel(ref, got)
    assert rel.max(initial=0.0) <= rtol, (name, float(rel.max()))


def test_exact_gelu_converts_and_matches_keras(tmp_path):
    # Keras 3's default gelu is the exact one; TensorFlow computes it through erfc.
    x = np.linspace(-12, 12, 97, dtype=np.float32)[None]
    ref, got, _ = _convert_and_run(tmp_path, keras.activations.gelu, x)
    # gelu(x) ~ 0 for x << 0; relative to the output's scale, float32's rounding is ~1e-7.
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_where_keeps_the_branch_not_taken_out_of_the_result(tmp_path):
    # tf2onnx's Mul/Add rewrite of a float Where turns log(0) * 0 into NaN.
    from keras import ops

    x = np.array([[-1.0, 0.0, 1e-3, 2.0, -np.inf, np.inf]], np.float32)
    ref, got, proto = _convert_and_run(tmp_path, lambda t: ops.where(t > 0, ops.log(ops.maximum(t, 0.0)), 0.0), x)
    assert "Where" in {n.op_type for n in proto.graph.node}
    np.testing.assert_array_equal(got, ref)


def test_nan_to_num_converts_exactly(tmp_path):
    from keras import ops

    x = np.array([[np.nan, np.inf, -np.inf, 1.5, -0.0]], np.float32)
    ref, got, _ = _convert_and_run(tmp_path, lambda t: ops.nan_to_num(t), x)
    np.testing.assert_array_equal(got, ref)


def test_argmax_ties_and_negative_zero(tmp_path):
    # Keras's float argmax maps -0.0 below 0.0 through signbit (Bitcast + BitwiseAnd).
    from keras import ops

    x = np.array([[-0.0, 0.0, -1.0], [0.0, -0.0, -1.0], [2.0, 2.0, 1.0], [-0.0, -0.0, -5.0],
                  [-np.inf, -np.inf, -np.inf], [1.0, np.inf, np.inf]], np.float32)
    for fn in (lambda t: ops.argmax(t, axis=-1), lambda t: ops.argmin(t, axis=-1),
               lambda t: ops.cast(ops.signbit(t), "int32")):
        ref, got, proto = _convert_and_run(tmp_path, fn, x)
        assert not {n.op_type for n in proto.graph.node} & {"Bitcast", "BitwiseAnd"}
        np.testing.assert_array_equal(got, ref)


def test_one_hot_of_argmax_and_out_of_range(tmp_path):
    from keras import ops

    x = np.array([[0.1, 0.9, 0.3], [-0.0, 0.0, -1.0], [5.0, 1.0, 5.0]], np.float32)
    ref, got, _ = _convert_and_run(tmp_path, lambda t: ops.one_hot(ops.argmax(t, axis=-1), 3), x)
    np.testing.assert_array_equal(got, ref)
    # Indices outside [0, depth): all-zero rows in TensorFlow and in ONNX OneHot.
    idx = np.array([[0, 2, 3, -1, 7]], np.int32)
    ref, got, _ = _convert_and_run(tmp_path, lambda t: ops.one_hot(t, 3), idx)
    np.testing.assert_array_equal(got, ref)


def test_bucketize_as_tensorflow_counts(tmp_path):
    layer = keras.layers.Discretization(bin_boundaries=[-1.0, 0.0, 0.5, 2.0])
    x = np.array([[-5.0, -1.0, -0.5, -0.0, 0.0, 0.25, 0.5, 1.99, 2.0, 9.0, np.inf, -np.inf, np.nan]], np.float32)
    ref, got, proto = _convert_and_run(tmp_path, layer, x)
    assert "Bucketize" not in {n.op_type for n in proto.graph.node}
    np.testing.assert_array_equal(got, ref)


def test_cumprod_on_a_negative_axis(tmp_path):
    from keras import ops

    x = np.random.default_rng(0).uniform(0.5, 1.5, size=(2, 3, 5)).astype(np.float32)
    for axis in (-1, -2, 1):
        ref, got, _ = _convert_and_run(tmp_path, lambda t: ops.cumprod(t, axis=axis), x)
        np.testing.assert_allclose(got, ref, rtol=1e-6)  # a product of <= 5 terms: a few ulp


@pytest.mark.parametrize("sizes", [(8, 8, 12, 12), (8, 6, 5, 13), (7, 9, 21, 4), (3, 3, 1, 1)])
@pytest.mark.parametrize("align_corners, half_pixel_centers", [(False, True), (False, False), (True, False)])
def test_bicubic_resize_is_tensorflows_own(tmp_path, sizes, align_corners, half_pixel_centers):
    # ONNX Resize (cubic, a=-0.5) computes the Keys weights exactly; TensorFlow rounds the
    # fractional position to 1/1024 (its coefficient table) and renormalizes at borders.
    # Before: 5.5e-4 relative apart. The handler's matrices are TensorFlow's weights:
    # float32 rounding of a 16-term sum apart (~1e-7; 1e-6 bound).
    import tensorflow as tf

    h, w, oh, ow = sizes
    x = np.random.default_rng(0).standard_normal((2, h, w, 3)).astype(np.float32)
    fn = lambda t: tf.raw_ops.ResizeBicubic(images=t, size=[oh, ow], align_corners=align_corners,  # noqa: E731
                                            half_pixel_centers=half_pixel_centers)
    ref, got, proto = _convert_and_run(tmp_path, fn, x)
    assert "Resize" not in {n.op_type for n in proto.graph.node}
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("kernel", ["lanczos1", "lanczos3", "lanczos5", "gaussian", "box", "triangle",
                                    "keyscubic", "mitchellcubic"])
@pytest.mark.parametrize("antialias", [True, False])
def test_scale_and_translate_is_tensorflows_own(tmp_path, kernel, antialias):
    # Antialiased and Lanczos resizes: no ONNX Resize mode; with static sizes the op is
    # linear and separable, and the handler's matrices hold TensorFlow's weights.
    import tensorflow as tf

    x = np.random.default_rng(1).standard_normal((2, 9, 7, 3)).astype(np.float32)
    for size in ((5, 13), (12, 4)):
        scale = np.array([size[0] / 9, size[1] / 7], np.float32)
        fn = lambda t: tf.raw_ops.ScaleAndTranslate(  # noqa: E731
            images=t, size=list(size), scale=scale, translation=np.array([0.3, -0.2], np.float32),
            kernel_type=kernel, antialias=antialias)
        ref, got, proto = _convert_and_run(tmp_path, fn, x)
        assert "ScaleAndTranslate" not in {n.op_type for n in proto.graph.node}
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()  # float32 sums of <= 66 terms


@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos3"])
def test_keras_resizes_convert_and_dynamic_sizes_are_refused_by_name(tmp_path, interpolation):
    from keras_bn_ext.errors import ExportError
    from keras_bn_ext.export.driver import export_verified
    from keras_bn_ext.export.onnx.options import OnnxOptions
    from keras_bn_ext.export.onnx.target import OnnxTarget

    cpu = OnnxTarget(OnnxOptions(provider="cpu"))

    def model(shape):
        x = keras.Input(shape, name="image")
        return keras.Model(x, keras.layers.Resizing(12, 12, interpolation=interpolation)(x))

    result = export_verified(model((8, 8, 3)), tmp_path / "static.onnx", target=cpu)
    assert result.passed and result.verification.comparison.max_rel_err <= 1e-5
    op = {"bicubic": "ResizeBicubic", "lanczos3": "ScaleAndTranslate"}[interpolation]
    with pytest.raises(ExportError, match=op) as info:
        export_verified(model((None, None, 3)), tmp_path / "dynamic.onnx", target=cpu)
    assert info.value.op == op or op in str(info.value)
    assert not (tmp_path / "dynamic.onnx").exists()
