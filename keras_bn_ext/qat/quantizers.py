"""The fake-quantization arithmetic of quantization-aware training, written once in
`keras.ops` (TensorFlow, JAX and PyTorch) and once in numpy for the export, so that what
training simulates is, bit for bit in float32, what the written file's QuantizeLinear and
DequantizeLinear nodes compute.

Activations: asymmetric uint8, ONNX's QuantizeLinear
    s = (max - min) / 255,  zp = round(-min / s),  q = clip(round(x / s) + zp, 0, 255),
    x^ = (q - zp) * s
with min <= 0 <= max (0 is exactly representable, as onnxruntime requires) and round half to
even (ONNX's rounding). Weights: symmetric, zero point 0, narrow range [-(2^(b-1) - 1),
2^(b-1) - 1] (int8: [-127, 127]; int4: [-7, 7]), one scale per output channel or per tensor.

Gradients are straight-through (Bengio 2013; Jacob et al. 2018): the rounding passes the
gradient unchanged inside the range, and the range ends receive the gradient of what they
clip (TensorFlow's FakeQuantWithMinMaxVars gradient).
"""

from __future__ import annotations

import numpy as np
from keras import ops

__all__ = ["ACTIVATION_LEVELS", "activation_params", "activation_params_np", "fake_quant_activation",
           "fake_quant_weight", "weight_qmax", "weight_scale", "weight_scale_np"]

ACTIVATION_LEVELS = 255  # uint8
# A range narrower than this is widened to it (a dead channel's constant output): the scale
# must stay positive for QuantizeLinear.
_MIN_RANGE = 1e-6


def weight_qmax(bits: int, *, reduce_range: bool = False) -> int:
    """The largest magnitude of a narrow-range symmetric `bits`-bit weight (int8: 127; with
    `reduce_range`, 7-bit weights in int8: 63, which CPUs without VNNI need against the
    saturation of their u8s8 multiply-adds)."""
    return 2 ** (bits - 2 if reduce_range and bits == 8 else bits - 1) - 1


def _effective_range(minimum, maximum):
    lo = ops.minimum(minimum, 0.0)
    hi = ops.maximum(ops.maximum(maximum, 0.0), lo + _MIN_RANGE)
    return lo, hi


def activation_params(minimum, maximum):
    """(scale, zero point as a float) of the uint8 grid for the range [minimum, maximum]."""
    lo, hi = _effective_range(minimum, maximum)
    scale = (hi - lo) / float(ACTIVATION_LEVELS)
    zero_point = ops.clip(ops.round(-lo / scale), 0.0, float(ACTIVATION_LEVELS))
    return scale, zero_point


def activation_params_np(minimum: float, maximum: float) -> tuple[np.float32, int]:
    """`activation_params` in numpy float32: the same IEEE operations, so the same bits."""
    f = np.float32
    lo = np.minimum(f(minimum), f(0.0))
    hi = np.maximum(np.maximum(f(maximum), f(0.0)), lo + f(_MIN_RANGE))
    scale = (hi - lo) / f(ACTIVATION_LEVELS)
    zero_point = np.clip(np.round(-lo / scale), f(0.0), f(ACTIVATION_LEVELS))
    return f(scale), int(zero_point)


def fake_quant_activation(x, minimum, maximum):
    """x quantized to uint8 on [minimum, maximum] and dequantized (straight-through)."""
    return _fake_quant_activation(x, ops.cast(minimum, x.dtype), ops.cast(maximum, x.dtype))


@ops.custom_gradient
def _fake_quant_activation(x, minimum, maximum):
    # One function with its gradient written out (as TensorFlow's FakeQuantWithMinMaxVars
    # kernel is): the forward pass is the grid value itself, and the backward pass is two
    # masks, where a straight-through expression (clip + stop_gradient(exact - clip)) costs
    # a dozen passes over the tensor and made a QAT training step ~2x a float one.
    scale, zero_point = activation_params(minimum, maximum)
    q = ops.clip(ops.round(x / scale) + zero_point, 0.0, float(ACTIVATION_LEVELS))
    exact = (q - zero_point) * scale

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        # The range ends learn from what they clip (TensorFlow's FakeQuantWithMinMaxVars
        # gradient); the lower end only while it is below 0, the upper only above.
        below = ops.less(x, ops.minimum(minimum, 0.0))
        above = ops.greater(x, ops.maximum(maximum, 0.0))
        zero = ops.zeros_like(upstream)
        d_x = ops.where(ops.logical_or(below, above), zero, upstream)
        d_min = ops.sum(ops.where(below, upstream, zero)) * ops.cast(minimum <= 0.0, upstream.dtype)
        d_max = ops.sum(ops.where(above, upstream, zero)) * ops.cast(maximum >= 0.0, upstream.dtype)
        return d_x, ops.cast(d_min, minimum.dtype), ops.cast(d_max, maximum.dtype)

    return exact, grad


def weight_scale(kernel, axes, qmax: int):
    """Per-channel (or, with axes=None, per-tensor) max-abs scale of a symmetric grid;
    `axes`: the kernel axes reduced over (all but the output channel's). No gradient."""
    kernel = ops.stop_gradient(kernel)
    peak = ops.max(ops.abs(kernel), axis=axes, keepdims=True) if axes is not None else ops.max(ops.abs(kernel))
    peak = ops.where(peak > 0, peak, ops.ones_like(peak))  # an all-zero channel: any scale serves
    return peak / float(qmax)


def weight_scale_np(kernel: np.ndarray, axes, qmax: int) -> np.ndarray:
    """`weight_scale` in numpy float32."""
    kernel = np.asarray(kernel, np.float32)
    peak = np.max(np.abs(kernel), axis=axes, keepdims=True) if axes is not None else np.max(np.abs(kernel))
    peak = np.where(peak > 0, peak, np.float32(1.0)).astype(np.float32)
    return (peak / np.float32(qmax)).astype(np.float32)


def fake_quant_weight(kernel, scale, qmax: int):
    """kernel on the symmetric grid [-qmax, qmax] of `scale` (straight-through)."""
    qmax = float(qmax)
    q = ops.clip(ops.round(kernel / scale), -qmax, qmax)
    return kernel + ops.stop_gradient(q * scale - kernel)
