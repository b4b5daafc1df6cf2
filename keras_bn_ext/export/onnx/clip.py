"""MSE-optimal weight clipping for 4-bit post-training quantization of an ONNX float graph.

With 4-bit weights the max-abs scale spends most of 16 levels on a few large weights; the
range that minimizes the weight's squared rounding error is narrower (Banner et al. 2019;
the "MSE" range setting of AIMET and NNCF). Each Conv/MatMul weight initializer is clipped,
per output channel (or per tensor), to +-alpha * max|w| with the alpha that minimizes
||w - Q(clip(w))||^2 on onnxruntime's own symmetric int4 grid (scale = 2 max / 15, levels
[-8, 7], round half to even). onnxruntime's static quantization then takes the clipped
tensor's max-abs as its range, which is that optimum.

This writes a *copy* that feeds the quantizer only; the float reference stays the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ALPHAS", "clip_weights_mse", "mse_alpha"]

ALPHAS = np.linspace(0.2, 1.0, 81)  # fractions of max|w| tried
# onnxruntime's INT4 range for symmetric weights (quant_utils: INT4 is not in its symmetric
# table, so its full range [-8, 7] with scale = 2 * absmax / 15).
_QMIN, _QMAX = -8, 7


def _grid_error(w: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Squared error per column of `w` (rows: the entries, columns: channels) for each alpha:
    shape (len(ALPHAS), channels)."""
    errors = []
    for alpha in ALPHAS:
        scale = np.where(peak > 0, 2.0 * alpha * peak / (_QMAX - _QMIN), 1.0)
        q = np.clip(np.round(w / scale), _QMIN, _QMAX) * scale
        errors.append(np.sum((q - w) ** 2, axis=0))
    return np.stack(errors)


def mse_alpha(w: np.ndarray) -> np.ndarray:
    """The alpha per column of `w` (entries x channels) that minimizes its int4 rounding error."""
    peak = np.max(np.abs(w), axis=0)
    return ALPHAS[np.argmin(_grid_error(w, peak), axis=0)]


def clip_weights_mse(float_path: Path, out_path: Path, *, per_channel: bool) -> dict:
    """Write `float_path` with every Conv/MatMul weight clipped as the module says; returns
    {"tensors", "mean_alpha", "axes": {op type: the per-channel axis used}} (the quantizer must
    use the same axes: Conv 0, MatMul 1, Gemm 1 or 0 with transB)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(float_path))
    inits = {t.name: t for t in proto.graph.initializer}
    axes = {"Conv": 0, "MatMul": 1, "Gemm": 1}
    alphas, done = [], set()
    for node in proto.graph.node:
        if node.op_type not in axes or len(node.input) < 2 or node.input[1] not in inits or node.input[1] in done:
            continue
        # Gemm: the output axis of B, as onnxruntime's per-channel Gemm takes it (0 when transposed).
        gemm_axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
        tensor = inits[node.input[1]]
        w = numpy_helper.to_array(tensor).astype(np.float64)
        if w.ndim < 2 or not np.all(np.isfinite(w)):
            continue  # a non-finite weight is the quantizer's (and the checks') to refuse
        axis = (gemm_axis if node.op_type == "Gemm" else axes[node.op_type]) if per_channel else None
        columns = np.moveaxis(w, axis, -1).reshape(-1, w.shape[axis]) if axis is not None else w.reshape(-1, 1)
        alpha = mse_alpha(columns)
        limit = alpha * np.max(np.abs(columns), axis=0)
        if axis is not None:
            shape = [1] * w.ndim
            shape[axis] = -1
            limit = limit.reshape(shape)
        clipped = np.clip(w, -limit, limit).astype(numpy_helper.to_array(tensor).dtype)
        tensor.CopyFrom(numpy_helper.from_array(clipped, tensor.name))
        alphas.append(alpha)
        done.add(node.input[1])
    onnx.save_model(proto, str(out_path))
    mean = float(np.mean(np.concatenate([np.ravel(a) for a in alphas]))) if alphas else None
    return {"tensors": len(alphas), "mean_alpha": mean, "axes": axes}
