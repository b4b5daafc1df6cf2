"""Cross-layer equalization of a model *before* its BNs are folded, for quantization-aware
training with one weight scale per tensor.

A per-tensor grid must serve every output channel of a folded kernel w * gamma / sigma; a
depthwise conv's channels span ranges 5-8x apart on the project's fixtures, so the small
ones round to a handful of levels (W4 per-tensor: 94.3% -> 52% untrained). Equalization
(`quantization.equalize`, Nagel et al. 2019) evens those ranges, but it works on folded
kernels, while QAT keeps each BN beside its conv to train with batch statistics.

So the scales are found where they are defined, on the folded model (the BNs QAT fuses
folded, the others kept), and applied to the unfolded one: output channel c of a layer
with a fused BN is divided by s_c through the BN's gamma and beta (BN(x) / s_c, exactly,
with batch statistics as with moving ones); of a layer without one, through its kernel
and bias (a backward fold by 1 / s_c); the next layer's input channel c is multiplied by
s_c (a forward fold). Both are the fold rules' own arithmetic. The result computes what
the model computes, in training as in inference; it is checked against the model on real
inputs before it is used (`compare_models`, 1e-5).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn_ext.compare import compare_models
from keras_bn_ext.errors import VerificationError
from keras_bn_ext.folding import rules
from keras_bn_ext.folding.analysis import analyze
from keras_bn_ext.folding.fold import fold_batchnorms
from keras_bn_ext.quantization.equalize import EqualizationReport, SkippedPair, equalize_model
from keras_bn_ext.rebuild import RebuildPlan, rebuild

__all__ = ["equalize_unfolded"]


def _bn_weights_scaled(bn, weights: list[np.ndarray], s: np.ndarray) -> list[np.ndarray]:
    """`bn`'s weights with gamma and beta divided by s (its output divided by s)."""
    out = []
    for variable, value in zip(bn.weights, weights):
        leaf = variable.path.split("/")[-1]
        out.append((value / s).astype(value.dtype) if leaf in ("gamma", "beta") else value)
    return out


def equalize_unfolded(model: keras.Model, pairs: dict[int, keras.layers.Layer], inputs) -> tuple[
        keras.Model, EqualizationReport]:
    """`model` equalized as its folded form would be, its BNs kept (see the module).

    Args:
        model: A Functional model (never changed).
        pairs: id(conv/dense) -> the BN QAT fuses with it (`qat.pairs.fused_pairs`).
        inputs: Real inputs (a list in input order) the result is checked on.

    Returns:
        `(equalized, report)`: `model` itself when no pair can be equalized.

    Raises:
        VerificationError: the equalized model is off the model (it should be exact).
    """
    fused = {id(bn) for bn in pairs.values()}
    keep = [d.path for d in analyze(model) if id(d.bn) not in fused]
    folded, _ = fold_batchnorms(model, exclude=keep, inline=False, verify=False)
    _, report = equalize_model(folded, absorb_bias=False)
    layers = {layer.name: layer for layer in model.layers}
    weights: dict[int, list[np.ndarray]] = {}
    plan = RebuildPlan()
    applied = []
    for p in report.pairs:
        first, second = layers.get(p.first), layers.get(p.second)
        bn = pairs.get(id(first)) if first is not None else None
        if first is None or second is None or (bn is not None and not bn.scale):
            why = "inside a nested model" if first is None or second is None else "its BN has no gamma (scale=False)"
            report.skipped.append(SkippedPair(first=p.first, code="not_a_target", reason=f"not applied: {why}"))
            continue
        if bn is not None:
            weights[id(bn)] = _bn_weights_scaled(bn, weights.get(id(bn)) or bn.get_weights(), p.scales)
        else:
            weights[id(first)] = rules.fold_backward(first, 1.0 / p.scales, np.zeros_like(p.scales),
                                                     weights.get(id(first)))
            plan.configs[id(first)] = rules.with_bias(first, first.get_config())
        weights[id(second)] = rules.fold_forward(second, p.input_scales, np.zeros_like(p.input_scales),
                                                 weights.get(id(second)))
        plan.configs[id(second)] = rules.with_bias(second, second.get_config())
        applied.append(p)
    report.pairs = applied
    if not applied:
        return model, report
    plan.new_weights.update(weights)
    equalized = rebuild(model, plan)
    check = compare_models(model, equalized, inputs=list(inputs))
    if not check.passed:
        raise VerificationError(f"cross-layer equalization before the BN fold changed the model's outputs by "
                                f"{check.max_rel_err:.3g} relative (an exact transform should not): please report it")
    return equalized, report
