"""tf2onnx handlers for TensorFlow ops that Keras 3 emits and tf2onnx 1.17 lacks or gets
wrong, registered through tf2onnx's own extension API (`tf2onnx.handler.tf_op`, the
decorator its built-in handlers use), each in standard ONNX ops.

Importing this module registers them, process-wide, for every later conversion
(`register()` is that import, named). What each one does and why:

- `Select`/`SelectV2` (Keras's `ops.where`): tf2onnx writes `Cast(c)*a + Cast(!c)*b` for
  float outputs unless the condition is a bare IsNaN/IsInf, so a branch not taken that is
  inf or NaN (a guarded `log`, `sqrt`, `nan_to_num`) gives `inf*0 = NaN`. Here a float
  `Where` stays a `Where`: exact for every value.
- `Erfc` (Keras's exact `gelu`, `ops.erfc`): Numerical Recipes' Chebyshev fit (fractional
  error < 1.2e-7 everywhere), with exp(-x^2) split as exp(-h^2) exp(-(x-h)(x+h)) so the
  relative error stays at float32's for large |x|, where 1 - erf(x) would be 0.
- `Expm1` (`celu`, `ops.expm1`) and `Log1p` (`ops.log1p`, `logaddexp`): Kahan's
  formulas, accurate near 0 where exp(x) - 1 and log(1 + x) lose every digit.
- `Erfinv`: Giles' single-precision approximation (2010), exact at +-1.
- `Bitcast` float32 -> int32 read only through a sign-bit mask, then `BitwiseAnd`
  (TensorFlow's `signbit`, which Keras's `argmax`/`argmin` use to tell -0.0 from 0.0):
  the sign as `x < 0 or 1/x < 0` (true for -0.0), as the int32 the mask would give.
  Any other bitcast is refused by name.
- `Bucketize` (`Discretization`): the number of boundaries b with not (x < b), as
  TensorFlow's upper_bound counts them (NaN falls in the last bucket, as there).
- `Cumprod` with a negative axis: tf2onnx's handler crashes; the axis is made positive.
- `OneHot` (`ops.one_hot`): TensorFlow gives an all-off row for any index outside
  [0, depth); ONNX counts a negative index from the end. Negative indices are moved out of
  range first.
- `ScaleAndTranslate` (antialiased and Lanczos/Gaussian/Mitchell/box resizes): no ONNX Resize
  mode computes them, but with static sizes the op is linear and separable: its weights
  (TensorFlow's kernels, spans and normalization) become one constant matrix per axis, one
  Einsum, as below. Its scale and translation must evaluate to constants at conversion time
  (Keras's resize computes them from the static input shape); otherwise it is refused.
- `ResizeBicubic` (bicubic `Resizing`, `ops.image.resize`): tf2onnx writes ONNX Resize
  (cubic, a = -0.5), which computes the Keys weights exactly; TensorFlow looks them up in a
  1024-entry table (the fractional source position rounded to 1/1024), ~6e-4 of the output
  apart. Here the resize is TensorFlow's own: its weights, table lookup, border
  renormalization (half-pixel centers) or clamping (legacy) included, are computed at
  conversion time into one constant matrix per axis, applied by one Einsum (static sizes).

`REFUSED` holds the reason for each op that ONNX cannot express as TensorFlow computes
it (none is left); a handler that cannot convert one node (dynamic sizes, a bitcast other
than signbit's) raises, and the converter names the op.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto
from tf2onnx import utils
from tf2onnx.graph_builder import GraphBuilder
from tf2onnx.handler import tf_op
from tf2onnx.onnx_opset import controlflow as _controlflow
from tf2onnx.onnx_opset import math as _math
from tf2onnx.onnx_opset import tensor as _tensor

__all__ = ["REFUSED", "register"]

REFUSED: dict[str, str] = {}

_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_SIGN_PREFIX = "keras_bn_ext_sign_as_int32"
_INT32_MIN = np.iinfo(np.int32).min


def register() -> None:
    """The handlers are registered when this module is imported; this names that step."""


class _Builder:
    """Makes nodes in the scope of the node being replaced, in its input's dtype."""

    def __init__(self, ctx, node, dtype=None):
        self.ctx, self.node = ctx, node
        self.dtype = dtype if dtype is not None else ctx.get_dtype(node.input[0])
        self.np_dtype = utils.map_onnx_to_numpy_type(self.dtype)

    def __call__(self, op_type, *inputs, **attr):
        return self.ctx.make_node(op_type, list(inputs), attr=attr, op_name_scope=self.node.name).output[0]

    def const(self, value, np_dtype=None):
        array = np.array(value, dtype=np_dtype or self.np_dtype)
        return self.ctx.make_const(utils.make_name(f"{self.node.name}_c"), array).output[0]

    def poly(self, t, coefficients):
        """Horner: c0 + t*(c1 + t*(c2 + ...))."""
        acc = self.const(coefficients[-1])
        for c in reversed(coefficients[:-1]):
            acc = self("Add", self.const(c), self("Mul", t, acc))
        return acc

    def replace(self, result, name=None):
        """The replaced node's outputs now come from `result`."""
        ctx, node = self.ctx, self.node
        outputs, shapes = node.output, [ctx.get_shape(node.output[0])]
        dtypes = [ctx.get_dtype(node.output[0])]
        ctx.remove_node(node.name)
        ctx.make_node("Identity", [result], outputs=outputs, shapes=shapes, dtypes=dtypes,
                      name=name or utils.make_name(node.name))


# -- Where that stays Where ---------------------------------------------------------------

@tf_op(["Select", "SelectV2"])
class Select(_controlflow.Select):
    @classmethod
    def version_9(cls, ctx, node, **kwargs):
        if ctx.get_dtype(node.output[0]) in _FLOATS:
            node.set_attr("handles_nan", True)  # tf2onnx's own switch: keep Where
        super().version_9(ctx, node, **kwargs)


# -- Erfc, Expm1, Log1p, Erfinv -------------------------------------------------------------

_ERFC = [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
         1.48851587, -0.82215223, 0.17087277]


@tf_op("Erfc")
class Erfc:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        b = _Builder(ctx, node)
        x = node.input[0]
        z = b("Abs", x)
        t = b("Div", b.const(1.0), b("Add", b.const(1.0), b("Mul", b.const(0.5), z)))
        # exp(-z^2) = exp(-h^2) * exp(-(z - h)(z + h)), h = z rounded down to 1/16: h^2 is exact.
        h = b("Div", b("Floor", b("Mul", z, b.const(16.0))), b.const(16.0))
        split = b("Mul", b("Sub", z, h), b("Add", z, h))
        tail = b("Mul", b("Exp", b("Neg", b("Mul", h, h))), b("Exp", b("Sub", b.poly(t, _ERFC), split)))
        positive = b("Mul", t, tail)
        # z = inf: t = 0 and the exponentials 0 (or NaN through inf - inf): erfc is 0 there.
        positive = b("Where", b("IsInf", z), b.const(0.0), positive)
        b.replace(b("Where", b("Less", x, b.const(0.0)), b("Sub", b.const(2.0), positive), positive))


@tf_op("Expm1")
class Expm1:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        b = _Builder(ctx, node)
        x = node.input[0]
        u = b("Exp", x)
        um1 = b("Sub", u, b.const(1.0))
        # Kahan: (u - 1) * x / log(u) cancels the rounding of u; u == 1 means |x| below ulp.
        kahan = b("Mul", um1, b("Div", x, b("Log", u)))  # x / log(u) ~ 1: no overflow
        r = b("Where", b("Equal", um1, b.const(-1.0)), b.const(-1.0), kahan)
        r = b("Where", b("Equal", u, b.const(1.0)), x, r)
        b.replace(b("Where", b("IsInf", u), u, r))


@tf_op("Log1p")
class Log1p:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        b = _Builder(ctx, node)
        x = node.input[0]
        u = b("Add", x, b.const(1.0))
        # Goldberg: log(u) * x / (u - 1) cancels the rounding of 1 + x.
        r = b("Mul", b("Log", u), b("Div", x, b("Sub", u, b.const(1.0))))
        r = b("Where", b("Equal", u, b.const(1.0)), x, r)
        r = b("Where", b("Equal", u, b.const(0.0)), b.const(-np.inf), r)
        b.replace(b("Where", b("IsInf", u), u, r))


_ERFINV_CENTRAL = [1.50140941, 0.246640727, -0.00417768164, -0.00125372503, 0.00021858087, -4.39150654e-06,
                   -3.5233877e-06, 3.43273939e-07, 2.81022636e-08]
_ERFINV_TAIL = [2.83297682, 1.00167406, 0.00943887047, -0.0076224613, 0.00573950773, -0.00367342844,
                0.00134934322, 0.000100950558, -0.000200214257]


@tf_op("Erfinv")
class Erfinv:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        b = _Builder(ctx, node)
        x = node.input[0]
        w = b("Neg", b("Log", b("Mul", b("Sub", b.const(1.0), x), b("Add", b.const(1.0), x))))
        central = b.poly(b("Sub", w, b.const(2.5)), _ERFINV_CENTRAL)
        tail = b.poly(b("Sub", b("Sqrt", w), b.const(3.0)), _ERFINV_TAIL)
        p = b("Where", b("Less", w, b.const(5.0)), central, tail)
        r = b("Mul", p, x)
        # |x| = 1: +-inf (the polynomial would give inf * -inf); |x| > 1 stays NaN (log < 0).
        b.replace(b("Where", b("Equal", b("Abs", x), b.const(1.0)), b("Mul", x, b.const(np.inf)), r))


# -- signbit: Bitcast float32 -> int32, then BitwiseAnd with the sign mask ------------------

def _is_sign_mask(ctx, name) -> bool:
    producer = ctx.get_node_by_output(name)
    return producer is not None and producer.is_const() and np.all(
        producer.get_tensor_value(as_list=False) == _INT32_MIN)


@tf_op("Bitcast")
class Bitcast:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        src, dst = ctx.get_dtype(node.input[0]), ctx.get_dtype(node.output[0])
        consumers = ctx.find_output_consumers(node.output[0])
        utils.make_sure(
            src == TensorProto.FLOAT and dst == TensorProto.INT32 and consumers and all(
                c.type == "BitwiseAnd" and any(_is_sign_mask(ctx, i) for i in c.input) for c in consumers),
            "Bitcast %s: ONNX has no bitcast; only float32 -> int32 read through the sign-bit mask "
            "(TensorFlow's signbit) is converted", node.name)
        b = _Builder(ctx, node)
        x = node.input[0]
        negative = b("Or", b("Less", x, b.const(0.0)), b("Less", b("Div", b.const(1.0), x), b.const(0.0)))
        as_int = b("Where", negative, b.const(_INT32_MIN, np.int32), b.const(0, np.int32))
        b.replace(as_int, name=utils.make_name(_SIGN_PREFIX))


@tf_op("BitwiseAnd")
class BitwiseAnd:
    @classmethod
    def _sign_read(cls, ctx, node):
        for value, mask in ((0, 1), (1, 0)):
            producer = ctx.get_node_by_output(node.input[value])
            if producer is not None and producer.name.startswith(_SIGN_PREFIX) and _is_sign_mask(
                    ctx, node.input[mask]):
                return node.input[value]
        return None

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        sign = cls._sign_read(ctx, node)
        utils.make_sure(sign is not None, "BitwiseAnd %s needs opset 18 (ONNX BitwiseAnd)", node.name)
        cls._identity(ctx, node, sign)

    @classmethod
    def version_18(cls, ctx, node, **kwargs):
        sign = cls._sign_read(ctx, node)
        if sign is not None:
            cls._identity(ctx, node, sign)  # INT32_MIN or 0, masked by INT32_MIN: itself

    @staticmethod
    def _identity(ctx, node, value):
        ctx.replace_inputs(node, [value])
        node.type = "Identity"


# -- Bucketize, Cumprod, refusals -----------------------------------------------------------

@tf_op("Bucketize")
class Bucketize:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        boundaries = [float(v) for v in node.get_attr_value("boundaries")]
        b = _Builder(ctx, node)
        x = node.input[0]
        gb = GraphBuilder(ctx)
        column = gb.make_unsqueeze({"data": x, "axes": [-1]})
        below = b("Less", column, b.const(boundaries))  # x < b, for each boundary
        counted = b("Cast", b("Not", below), to=TensorProto.INT32)
        total = gb.make_reduce_sum({"data": counted, "axes": [-1], "keepdims": 0, "noop_with_empty_axes": 1})
        b.replace(total)


@tf_op("Cumprod")
class Cumprod(_math.CumProd):
    @classmethod
    def version_10(cls, ctx, node, **kwargs):
        axis = node.inputs[1]
        if axis.is_const():
            value = int(axis.get_tensor_value())
            if value < 0:
                value += len(ctx.get_shape(node.input[0]))
                const = ctx.make_const(utils.make_name(f"{node.name}_axis"),
                                       np.array(value, dtype=axis.get_tensor_value(as_list=False).dtype))
                ctx.replace_input(node, node.input[1], const.output[0], 1)
        super().version_10(ctx, node, **kwargs)


@tf_op("OneHot")
class OneHot(_tensor.OneHot):
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        b = _Builder(ctx, node)
        indices = node.input[0]
        depth = b("Cast", node.input[1], to=ctx.get_dtype(indices))
        zero = b.const(0, utils.map_onnx_to_numpy_type(ctx.get_dtype(indices)))
        ctx.replace_input(node, indices, b("Where", b("Less", indices, zero), depth, indices), 0)
        super().version_13(ctx, node, **kwargs)


_TABLE = 1024  # TensorFlow's kTableSize (resize_bicubic_op.cc)


def _coefficients(a: float) -> np.ndarray:
    """TensorFlow's bicubic coefficient table, in float32 as it computes it."""
    table = np.zeros((_TABLE + 1) * 2, np.float32)
    a = np.float32(a)
    for i in range(_TABLE + 1):
        x = np.float32(i * 1.0 / _TABLE)
        table[i * 2] = ((a + 2) * x - (a + 3)) * x * x + 1
        x = x + np.float32(1.0)
        table[i * 2 + 1] = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return table


def bicubic_matrix(n_in: int, n_out: int, *, align_corners: bool, half_pixel_centers: bool) -> np.ndarray:
    """(n_out, n_in) float32: output row i = sum_p M[i, p] * input row p, as TensorFlow's
    ResizeBicubic weighs and indexes them along one axis."""
    keys = half_pixel_centers
    table = _coefficients(-0.5 if keys else -0.75)
    scale = np.float32((n_in - 1) / np.float32(n_out - 1)) if align_corners and n_out > 1 else \
        np.float32(n_in / np.float32(n_out))
    matrix = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        where = (np.float32(i) + np.float32(0.5)) * scale - np.float32(0.5) if keys else np.float32(i) * scale
        base = int(np.floor(where))
        offset = int(np.rint(np.float32(where - np.float32(base)) * np.float32(_TABLE)))
        taps = [(base - 1, table[offset * 2 + 1]), (base, table[offset * 2]),
                (base + 1, table[(_TABLE - offset) * 2]), (base + 2, table[(_TABLE - offset) * 2 + 1])]
        weights = []
        for index, weight in taps:
            bounded = min(n_in - 1, max(0, index))
            weights.append((bounded, np.float32(0.0) if keys and bounded != index else weight))
        if keys:
            total = np.float32(sum(w for _, w in weights))
            if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
                weights = [(p, w * (np.float32(1.0) / total)) for p, w in weights]
        for p, w in weights:
            matrix[i, p] += w
    return matrix


@tf_op("ResizeBicubic")
class ResizeBicubic:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        size = _static_value(ctx, node.input[1])
        shape = _static_image_shape(ctx, node, size)
        out_h, out_w = (int(v) for v in size)
        options = {"align_corners": bool(node.get_attr_value("align_corners", 0)),
                   "half_pixel_centers": bool(node.get_attr_value("half_pixel_centers", 0))}
        _separable(_Builder(ctx, node, dtype=TensorProto.FLOAT), node.input[0],
                   bicubic_matrix(shape[1], out_h, **options), bicubic_matrix(shape[2], out_w, **options))


def _static_image_shape(ctx, node, *values):
    """The NHWC input shape of a resize whose weights are computed at conversion time: its
    height, width and every value in `values` (from `_static_value`) must be known."""
    shape = ctx.get_shape(node.input[0])
    utils.make_sure(
        shape is not None and len(shape) == 4 and shape[1] > 0 and shape[2] > 0 and all(
            v is not None and np.all(np.isfinite(v)) for v in values),
        "%s %s: TensorFlow's weights are computed at conversion time, which needs static sizes "
        "(and scale and translation)", node.type, node.name)
    return shape


def _separable(b, x, rows, cols):
    """b.replace with rows @ x @ cols^T over the H and W axes of an NHWC tensor."""
    if b.ctx.get_dtype(x) != TensorProto.FLOAT:
        x = b("Cast", x, to=TensorProto.FLOAT)
    b.replace(b("Einsum", b.const(rows), x, b.const(cols), equation="ip,npqc,jq->nijc"))


def _static_value(ctx, name, depth=0):
    """The value of a tensor computed from constants and static shapes only (float64, NaN
    for an unknown dimension), or None."""
    node = ctx.get_node_by_output(name)
    if node is None or depth > 12:
        return None
    if node.is_const():
        return node.get_tensor_value(as_list=False).astype(np.float64)
    if node.type == "Shape":
        shape = ctx.get_shape(node.input[0])
        return None if shape is None else np.array([d if d >= 0 else np.nan for d in shape], np.float64)
    args = [_static_value(ctx, i, depth + 1) for i in node.input]
    if any(a is None for a in args):
        return None
    unary = {"Identity": lambda a: a, "Cast": lambda a: a, "Neg": np.negative}
    binary = {"Div": np.divide, "RealDiv": np.divide, "Mul": np.multiply, "Add": np.add, "Sub": np.subtract}
    if node.type in unary:
        return unary[node.type](args[0])
    if node.type in binary:
        return binary[node.type](args[0], args[1])
    if node.type == "Slice" and len(args) >= 3:
        starts, ends = args[1].astype(int), args[2].astype(int)
        axes = args[3].astype(int) if len(args) > 3 else range(len(starts))
        steps = args[4].astype(int) if len(args) > 4 else [1] * len(starts)
        index = [slice(None)] * args[0].ndim
        for a, s0, e0, st in zip(axes, starts, ends, steps):
            index[a] = slice(s0, e0, st)
        return args[0][tuple(index)]
    return None


_SAMPLING = {
    "lanczos1": (1.0, lambda x: _lanczos(x, 1.0)), "lanczos3": (3.0, lambda x: _lanczos(x, 3.0)),
    "lanczos5": (5.0, lambda x: _lanczos(x, 5.0)),
    "gaussian": (1.5, lambda x: np.float32(0.0) if x >= 1.5 else np.float32(
        np.exp(-x * x / (2.0 * np.float32(0.5) * np.float32(0.5))))),
    "box": (1.0, lambda x: np.float32(1.0 if x < 0.5 else 0.5 if x == 0.5 else 0.0)),
    "triangle": (1.0, lambda x: np.float32(1.0) - x if x < 1.0 else np.float32(0.0)),
    "keyscubic": (2.0, lambda x: np.float32(0.0) if x >= 2 else (
        ((np.float32(-0.5) * x + np.float32(2.5)) * x - np.float32(4.0)) * x + np.float32(2.0) if x >= 1
        else ((np.float32(1.5) * x - np.float32(2.5)) * x) * x + np.float32(1.0))),
    "mitchellcubic": (2.0, lambda x: np.float32(0.0) if x >= 2 else (
        (((np.float32(-7.0 / 18.0)) * x + np.float32(2.0)) * x - np.float32(10.0 / 3.0)) * x + np.float32(16.0 / 9.0)
        if x >= 1 else (((np.float32(7.0 / 6.0)) * x - np.float32(2.0)) * x) * x + np.float32(8.0 / 9.0))),
}


def _lanczos(x, radius):
    pi = np.float32(3.14159265359)
    if x > radius:
        return np.float32(0.0)
    if x <= 1e-3:
        return np.float32(1.0)
    return np.float32(radius * np.sin(pi * x) * np.sin(pi * x / radius) / (pi * pi * x * x))


def scale_and_translate_matrix(n_in: int, n_out: int, scale: float, translate: float, *, kernel: str,
                               antialias: bool) -> np.ndarray:
    """(n_out, n_in) float32: TensorFlow's ScaleAndTranslate weights along one axis
    (scale_and_translate_op.cc, ComputeSpansCore)."""
    radius, fn = _SAMPLING[kernel]
    inv_scale = np.float32(1.0 / np.float32(scale))
    inv_translate = np.float32(-inv_scale * np.float32(translate))
    kernel_scale = np.float32(max(inv_scale, 1.0)) if antialias else np.float32(1.0)
    matrix = np.zeros((n_out, n_in), np.float32)
    for x in range(n_out):
        sample = np.float32(np.float32(x) + np.float32(0.5)) * inv_scale + inv_translate
        if sample < 0 or sample > n_in:
            continue
        start = int(np.ceil(sample - np.float32(radius) * kernel_scale - np.float32(0.5)))
        end = int(np.floor(sample + np.float32(radius) * kernel_scale - np.float32(0.5)))
        start, end = min(max(start, 0), n_in - 1), min(max(end, 0), n_in - 1) + 1
        weights = [fn(np.float32(abs((np.float32(src) + np.float32(0.5) - sample) / kernel_scale)))
                   for src in range(start, end)]
        total = np.float32(sum(weights, np.float32(0.0)))
        if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
            matrix[x, start:end] = np.array(weights, np.float32) * (np.float32(1.0) / total)
    return matrix


@tf_op("ScaleAndTranslate")
class ScaleAndTranslate:
    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        size, scale, translation = (_static_value(ctx, i) for i in node.input[1:4])
        shape = _static_image_shape(ctx, node, size, scale, translation)
        kernel = node.get_attr_value("kernel_type", b"lanczos3")
        kernel = kernel.decode() if isinstance(kernel, bytes) else kernel
        utils.make_sure(kernel in _SAMPLING, "ScaleAndTranslate %s: unknown kernel_type %s", node.name, kernel)
        antialias = bool(node.get_attr_value("antialias", 1))
        rows, cols = (scale_and_translate_matrix(int(shape[1 + k]), int(size[k]), float(scale[k]),
                                                 float(translation[k]), kernel=kernel, antialias=antialias)
                      for k in (0, 1))
        _separable(_Builder(ctx, node, dtype=TensorProto.FLOAT), node.input[0], rows, cols)


@tf_op(list(REFUSED))
class Refused:
    """Ops refused with their reason (none today: each one found was made to convert)."""

    @classmethod
    def version_13(cls, ctx, node, **kwargs):
        raise ValueError(f"{node.type} is not converted: {REFUSED.get(node.type, 'no handler')}")
