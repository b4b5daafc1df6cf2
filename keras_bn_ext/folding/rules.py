"""The fold rules: one table entry per layer class a BatchNormalization folds into.

A rule says where the layer's channels are, how its kernels change when a per-channel
affine map (scale, shift) follows it (a *backward* fold: layer -> BN) or precedes it
(a *forward* fold: BN -> layer), and what rules a forward fold out. Adding a foldable
layer class is one entry in `RULES` plus its tests; graph analysis and the rebuild
read everything from here. A wrapper (TimeDistributed) takes the rule of the layer it
wraps, every axis one further right: one entry in `WRAPPERS`, not one per pair.

Exact classes only: a subclass may change `call`, and folding into it would be a
guess. All arithmetic is float64; results are cast back to each variable's dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

__all__ = ["FoldRule", "RULES", "WRAPPERS", "rule_for", "unwrap", "why_not_target", "fold_backward", "fold_forward",
           "with_bias", "per_feature"]

Kernels = list  # the layer's weight arrays before its bias, in float64


def _channels_last_or_first(layer, rank: int) -> int:
    return rank - 1 if getattr(layer, "data_format", "channels_last") == "channels_last" else 1


def _last(layer, rank: int) -> int:
    return rank - 1


def _no_padding(layer) -> str | None:
    # A padded border gets 0 where the BN would have given its shift.
    if layer.padding != "valid":
        return f"pads its input (padding='{layer.padding}'): border outputs would change"
    return None


@dataclass(frozen=True)
class FoldRule:
    """How BN folds into one layer class.

    Attributes:
        output_axis: `(layer, rank) -> axis`: the channel axis of the layer's output.
        scale_output: `(layer, kernels, scale) -> kernels`: kernels of the layer
            followed by `scale` on its output channels (the bias is handled generically:
            `bias * scale + shift`).
        input_axis: `(layer, rank) -> axis`: the input axis a forward fold acts on; None
            when the class takes no forward fold.
        absorb_input: `(layer, kernels, scale, shift) -> (kernels, extra_bias)`: kernels
            of the layer preceded by the map on its input channels, and what the shift
            adds to the bias.
        forward_blocker: `layer -> reason or None`: what rules a forward fold out
            (padding, for convolutions).
        through_flatten: a forward fold may pass a Flatten (scale laid out per feature).
        n_kernels: weight arrays before the bias.
        unsupported: `layer -> reason or None`: a configuration no fold handles.
        add_bias: `(layer, config) -> config` of the same layer with a bias.
    """

    output_axis: Callable[[keras.layers.Layer, int], int]
    scale_output: Callable
    input_axis: Callable[[keras.layers.Layer, int], int] | None = None
    absorb_input: Callable | None = None
    forward_blocker: Callable[[keras.layers.Layer], str | None] = lambda layer: None
    through_flatten: bool = False
    n_kernels: int = 1
    unsupported: Callable[[keras.layers.Layer], str | None] = lambda layer: None
    add_bias: Callable[[keras.layers.Layer, dict], dict] = lambda layer, config: {**config, "use_bias": True}


# --- kernel maths per layout -------------------------------------------------------------

def _scale_kernel_last(layer, kernels, scale):
    return [kernels[0] * scale]  # (..., in, out)


def _scale_kernel_transposed(layer, kernels, scale):
    return [kernels[0] * scale[:, None]]  # (..., out, in)


def _scale_depthwise(layer, kernels, scale):
    c, m = kernels[0].shape[-2:]  # (..., C, M): output channel c*M + m
    return [kernels[0] * scale.reshape(c, m)]


def _scale_separable(layer, kernels, scale):
    return [kernels[0], kernels[1] * scale]  # pointwise kernel (..., C*M, out)


def _absorb_dense(layer, kernels, scale, shift):
    w = kernels[0]  # (in, out)
    return [w * scale[:, None]], shift @ w


def _absorb_conv(layer, kernels, scale, shift):
    w = kernels[0]  # (..., C/groups, out)
    groups = int(getattr(layer, "groups", 1))
    cin_g, out = w.shape[-2], w.shape[-1]
    group_of_out = np.arange(out) // (out // groups)
    s_mat = scale.reshape(groups, cin_g)[group_of_out].T  # (C/groups, out)
    t_mat = shift.reshape(groups, cin_g)[group_of_out].T
    spatial = tuple(range(w.ndim - 2))
    return [w * s_mat], (w.sum(axis=spatial) * t_mat).sum(axis=0)


def _absorb_depthwise(layer, kernels, scale, shift):
    w = kernels[0]  # (..., C, M)
    spatial = tuple(range(w.ndim - 2))
    return [w * scale[:, None]], (w.sum(axis=spatial) * shift[:, None]).reshape(-1)


def _absorb_separable(layer, kernels, scale, shift):
    dw, pw = kernels  # (..., C, M), (1.., C*M, out)
    spatial = tuple(range(dw.ndim - 2))
    u = (dw.sum(axis=spatial) * shift[:, None]).reshape(-1)  # the shift after the depthwise
    return [dw * scale[:, None], pw], u @ pw.reshape(pw.shape[-2], pw.shape[-1])


# --- EinsumDense: only equations that act per output channel on the last axis ------------

_EINSUM = re.compile(r"^([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)$")


def _einsum_spec(layer) -> tuple[str, str, str] | None:
    match = _EINSUM.match(layer.equation.replace(" ", ""))
    return match.groups() if match else None


def _einsum_unsupported(layer) -> str | None:
    spec = _einsum_spec(layer)
    reason = f"has equation '{layer.equation}', whose last output axis is not one kernel axis"
    if spec is None:
        return reason
    inp, ker, out = spec
    c = out[-1]
    if c == "." or c in inp or ker.count(c) != 1 or out.count(c) != 1:
        return reason  # the output's last axis must come from the kernel alone
    if layer.bias_axes not in (None, "", c):
        return f"has bias_axes '{layer.bias_axes}', not its last output axis '{c}'"
    return None


def _einsum_scale(layer, kernels, scale):
    _, ker, out = _einsum_spec(layer)
    shape = [1] * kernels[0].ndim
    shape[ker.index(out[-1])] = -1
    return [kernels[0] * scale.reshape(shape)]


def _einsum_forward_blocker(layer) -> str | None:
    inp, ker, out = _einsum_spec(layer)
    if ker != inp[-1] + out[-1] or inp[-1] in out:
        return f"has equation '{layer.equation}', which does not contract the input's last axis with a 2-D kernel"
    return None


def _einsum_add_bias(layer, config):
    return {**config, "bias_axes": _einsum_spec(layer)[2][-1]}


_CONV_RULE = FoldRule(
    output_axis=_channels_last_or_first,
    scale_output=_scale_kernel_last,
    input_axis=_channels_last_or_first,
    absorb_input=_absorb_conv,
    forward_blocker=_no_padding,
)
_TRANSPOSED_RULE = FoldRule(output_axis=_channels_last_or_first, scale_output=_scale_kernel_transposed)
_DEPTHWISE_RULE = FoldRule(
    output_axis=_channels_last_or_first,
    scale_output=_scale_depthwise,
    input_axis=_channels_last_or_first,
    absorb_input=_absorb_depthwise,
    forward_blocker=_no_padding,
)
_SEPARABLE_RULE = FoldRule(
    output_axis=_channels_last_or_first,
    scale_output=_scale_separable,
    input_axis=_channels_last_or_first,
    absorb_input=_absorb_separable,
    forward_blocker=_no_padding,
    n_kernels=2,
)

RULES: dict[type, FoldRule] = {
    keras.layers.Dense: FoldRule(
        output_axis=_last,
        scale_output=_scale_kernel_last,
        input_axis=_last,
        absorb_input=_absorb_dense,
        through_flatten=True,
    ),
    keras.layers.EinsumDense: FoldRule(
        output_axis=_last,
        scale_output=_einsum_scale,
        input_axis=_last,
        absorb_input=_absorb_dense,
        forward_blocker=_einsum_forward_blocker,
        unsupported=_einsum_unsupported,
        add_bias=_einsum_add_bias,
    ),
    keras.layers.Conv1D: _CONV_RULE,
    keras.layers.Conv2D: _CONV_RULE,
    keras.layers.Conv3D: _CONV_RULE,
    keras.layers.Conv1DTranspose: _TRANSPOSED_RULE,
    keras.layers.Conv2DTranspose: _TRANSPOSED_RULE,
    keras.layers.Conv3DTranspose: _TRANSPOSED_RULE,
    keras.layers.DepthwiseConv1D: _DEPTHWISE_RULE,
    keras.layers.DepthwiseConv2D: _DEPTHWISE_RULE,
    keras.layers.SeparableConv1D: _SEPARABLE_RULE,
    keras.layers.SeparableConv2D: _SEPARABLE_RULE,
}


# --- wrappers: a layer applied to every step of one more batch-like axis ------------------

# TimeDistributed(layer) runs `layer` on (batch * time, ...): its kernels are the wrapped
# layer's, and every channel axis is one further right. Its rule is the wrapped layer's,
# shifted; no entry per pair.
WRAPPERS = (keras.layers.TimeDistributed,)


def unwrap(layer):
    """The layer a wrapper applies (through nested wrappers), or `layer` itself."""
    while type(layer) in WRAPPERS:
        layer = layer.layer
    return layer


def _shifted(axis_fn):
    return lambda layer, rank: axis_fn(layer.layer, rank - 1) + 1


def _wrapped_rule(inner: FoldRule) -> FoldRule:
    def add_bias(layer, config):
        wrapped = config["layer"]
        return {**config, "layer": {**wrapped, "config": with_bias(layer.layer, wrapped["config"])}}

    return FoldRule(
        output_axis=_shifted(inner.output_axis),
        scale_output=lambda layer, kernels, scale: inner.scale_output(layer.layer, kernels, scale),
        input_axis=_shifted(inner.input_axis) if inner.input_axis is not None else None,
        absorb_input=(lambda layer, kernels, scale, shift: inner.absorb_input(layer.layer, kernels, scale, shift))
        if inner.absorb_input is not None else None,
        forward_blocker=lambda layer: inner.forward_blocker(layer.layer),
        through_flatten=False,
        n_kernels=inner.n_kernels,
        unsupported=lambda layer: why_not_target(layer.layer),
        add_bias=add_bias,
    )


def rule_for(layer) -> FoldRule | None:
    """The rule of `layer`'s exact class (a wrapper: its wrapped layer's, shifted), or None."""
    rule = RULES.get(type(layer))
    if rule is None and type(layer) in WRAPPERS:
        inner = rule_for(layer.layer)
        rule = _wrapped_rule(inner) if inner is not None else None
    return rule


def describe(layer) -> str:
    kind = type(layer).__name__
    if type(layer) in WRAPPERS:
        kind = f"{kind}({type(unwrap(layer)).__name__})"
    return f"'{layer.name}' ({kind})"


def why_not_target(layer) -> str | None:
    """Why no BN can fold into `layer` in either direction, as a predicate to follow the
    layer's name ("is quantized (int8)"), or None when one can."""
    rule = rule_for(layer)
    if rule is None:
        return "is not a conv/dense layer"
    if getattr(layer, "quantization_mode", None):
        return f"is quantized ({layer.quantization_mode})"
    if getattr(layer, "lora_enabled", False):
        return "has LoRA weights"
    return rule.unsupported(layer)


def with_bias(layer, config: dict) -> dict:
    """`layer`'s config, changed so that the layer has a bias."""
    return rule_for(layer).add_bias(layer, config)


def _split(layer, weights):
    """(kernels in float64, their dtypes, bias in float64 or None, bias dtype)."""
    weights = [np.asarray(w) for w in weights]
    n_kernels = rule_for(layer).n_kernels
    kernels, bias = weights[:n_kernels], (weights[n_kernels] if len(weights) > n_kernels else None)
    dtypes = [k.dtype for k in kernels]
    bias_dtype = bias.dtype if bias is not None else dtypes[-1]
    bias = bias.astype(np.float64) if bias is not None else None
    return [k.astype(np.float64) for k in kernels], dtypes, bias, bias_dtype


def _join(kernels, dtypes, bias, bias_dtype) -> list[np.ndarray]:
    return [k.astype(d) for k, d in zip(kernels, dtypes)] + [bias.astype(bias_dtype)]


def per_feature(values: np.ndarray, feature_shape: tuple, axis: int, data_format: str) -> np.ndarray:
    """Per-channel `values` laid out per feature of a Flatten of a `feature_shape` tensor
    (one example; channels on `axis`), in the Flatten's order: a channels_first Flatten
    moves the channel axis last first, as Keras does."""
    bshape = [1] * len(feature_shape)
    bshape[axis] = feature_shape[axis]
    x = np.broadcast_to(values.reshape(bshape), feature_shape)
    if data_format == "channels_first" and x.ndim > 1:
        x = np.moveaxis(x, 0, -1)
    return np.ascontiguousarray(x).reshape(-1)


def fold_backward(layer, scale: np.ndarray, shift: np.ndarray, weights=None) -> list[np.ndarray]:
    """Weights of `layer` followed by the affine map (scale, shift) on its output channels.

    `weights` defaults to the layer's own (pass earlier folded ones to compose). The
    returned list always carries a bias (rebuild the layer with `with_bias`).
    """
    kernels, dtypes, bias, bias_dtype = _split(layer, layer.get_weights() if weights is None else weights)
    kernels = rule_for(layer).scale_output(layer, kernels, scale)
    bias = np.zeros_like(scale) if bias is None else bias
    return _join(kernels, dtypes, bias * scale + shift, bias_dtype)


def fold_forward(layer, scale: np.ndarray, shift: np.ndarray, weights=None) -> list[np.ndarray]:
    """Weights of `layer` preceded by the affine map (scale, shift) on its input channels:
    layer(scale * x + shift) == layer'(x).

    One value per input channel (per input feature after a Flatten, laid out in the
    Flatten's order by the caller). The returned list always carries a bias.
    """
    kernels, dtypes, bias, bias_dtype = _split(layer, layer.get_weights() if weights is None else weights)
    kernels, extra = rule_for(layer).absorb_input(layer, kernels, scale, shift)
    bias = np.zeros_like(extra) if bias is None else bias
    return _join(kernels, dtypes, bias + extra, bias_dtype)
