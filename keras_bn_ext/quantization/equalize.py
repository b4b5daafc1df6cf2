"""Cross-layer equalization (Nagel et al. 2019, "Data-free quantization"), in Keras graph
space, on a folded model.

A conv/dense layer whose output channel c reaches the next conv/dense layer's input
channel c only through positively homogeneous operations (f(s x) = s f(x) for s > 0: a
linear or ReLU/LeakyReLU/PReLU activation, pooling, zero padding, Dropout, a Flatten
before a Dense) computes the same function when its output channel c is divided by s_c
and the next layer's input channel c multiplied by s_c. Choosing s_c = sqrt(r1_c / r2_c)
(r1_c: the range of the first layer's weights for output c, r2_c: of the second's for
input c) gives both the same range, so one per-tensor INT8 scale fits every channel. The
pairs are swept until the scales settle, which equalizes chains (conv -> depthwise ->
conv) too.

Both kernel maths come from the fold rules (`folding.rules`): dividing an output channel
is a backward fold with scale 1/s and no shift, multiplying an input channel a forward
fold with scale s (laid out per feature after a Flatten, as a forward BN fold is); the
pairs are found with folding's graph walk. ReLU6 is not homogeneous (min(6, s x) is not
s min(6, x)): such pairs are left alone and listed, unless `relu6_to_relu=True` replaces
each ReLU6 on a pair's path by ReLU first, which changes the function (stated in the
report; its verification is then against the model with ReLU).

High-bias absorption is done only where it is exact: on a path with no activation (only
linear operations) into a layer that does not pad, the first layer's bias moves into the
second's (layer2(x + b) = layer2(x) + W2 b). Through a ReLU it would need the data's
lower bounds, so it is not done there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.folding import rules
from keras_bn_ext.graph import GraphIndex, graph_of, is_rebuildable_model, single_path_consumer
from keras_bn_ext.rebuild import RebuildPlan, rebuild
from keras_bn_ext.folding.rules import describe, rule_for, unwrap, why_not_target

__all__ = ["EqualizationReport", "EqualizedPair", "equalize_model"]

_HOMOGENEOUS_ACTIVATIONS = ("linear", "relu", "leaky_relu")
_POOLING = (
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
)
_PADDING = (keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D)
_IDENTITY = (keras.layers.Dropout, keras.layers.Identity, keras.layers.Flatten)  # in inference
_SWEEPS = 50
_SETTLED = 1e-4  # max |log s| of a sweep below which the scales have settled


@dataclass
class EqualizedPair:
    first: str
    second: str
    through: list[str]
    max_scale: float  # max over channels of the total s_c applied (and 1/min): how far ranges were apart
    bias_absorbed: bool = False
    # The total s_c per channel of `first`'s output, and per input feature of `second` (laid out
    # in a Flatten's order when one is on the path): what moved, for a caller that applies the
    # same equalization to another form of the model (`qat.equalize`, before BN folding). Not
    # in the JSON report.
    scales: np.ndarray | None = field(default=None, repr=False, compare=False)
    input_scales: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("scales", "input_scales")}


@dataclass
class SkippedPair:
    first: str
    code: str  # relu6 | not_homogeneous | fork | channels | not_a_target
    reason: str


@dataclass
class EqualizationReport:
    pairs: list[EqualizedPair] = field(default_factory=list)
    skipped: list[SkippedPair] = field(default_factory=list)
    relu6_replaced: list[str] = field(default_factory=list)  # function changed: ReLU6 -> ReLU
    sweeps: int = 0

    def to_dict(self) -> dict:
        return {
            "pairs": [p.to_dict() for p in self.pairs],
            "skipped": [vars(s) for s in self.skipped],
            "relu6_replaced": self.relu6_replaced,
            "sweeps": self.sweeps,
        }


def _activation_name(fn) -> str:
    try:
        return keras.activations.serialize(fn) if not isinstance(fn, str) else fn
    except Exception:  # noqa: BLE001 - an unregistered callable: not known to be homogeneous
        return getattr(fn, "__name__", repr(fn))


def _relu6_like(op) -> bool:
    if type(op) is keras.layers.ReLU:
        return op.max_value is not None and float(op.threshold) == 0.0
    if type(op) is keras.layers.Activation:
        return _activation_name(op.activation) == "relu6"
    return False


def _homogeneous(op) -> tuple[bool, bool]:
    """(positively homogeneous per channel, passes a bias unchanged: f(x + b) = f(x) + b)
    for one operation on the path."""
    kind = type(op)
    if kind in _IDENTITY:
        return True, True
    if kind in _POOLING or kind in _PADDING:
        return True, False
    if kind is keras.layers.Activation:
        name = _activation_name(op.activation)
        return name in _HOMOGENEOUS_ACTIVATIONS, name == "linear"
    if kind is keras.layers.ReLU:
        return op.max_value is None and float(op.threshold) == 0.0, False
    if kind in (keras.layers.LeakyReLU, keras.layers.PReLU):
        return True, False
    return False, False


def _channels_last(op) -> bool:
    return getattr(op, "data_format", "channels_last") == "channels_last"


@dataclass
class _Pair:
    first: keras.layers.Layer
    second: keras.layers.Layer
    through: list
    linear: bool  # no activation anywhere between the two kernels
    flatten_shape: tuple | None  # the per-example shape before a Flatten, if one is on the path
    n: int  # channels between the two


def _find_pairs(model, report: EqualizationReport, relu6_to_relu: bool, relu6: list, prefix: str = ""):
    g = GraphIndex(graph_of(model))
    pairs = []
    for node in g.nodes:
        op = internals.node_operation(node)
        if op is None or internals.node_is_input(node):
            continue
        if is_rebuildable_model(op):
            pairs += _find_pairs(op, report, relu6_to_relu, relu6, prefix=f"{prefix}{op.name}/")
            continue
        rule = rule_for(op)
        if rule is None or why_not_target(op) is not None or g.calls.get(id(op), 0) != 1:
            continue
        name = prefix + op.name
        tensor = internals.node_outputs(node)[0]
        if id(tensor) in g.output_ids:
            continue  # a model output: there is no second layer

        def skip(code, reason):
            report.skipped.append(SkippedPair(first=name, code=code, reason=reason))

        own = _activation_name(unwrap(op).activation)
        if own not in _HOMOGENEOUS_ACTIVATIONS and not (own == "relu6" and relu6_to_relu):
            code = "relu6" if own == "relu6" else "not_homogeneous"
            skip(code, f"{describe(op)} has activation '{own}', which is not positively homogeneous")
            continue
        if not _channels_last(unwrap(op)) or rule.output_axis(op, len(tensor.shape)) != len(tensor.shape) - 1:
            skip("channels", f"{describe(op)} has its channels on another axis than the last")
            continue

        second, through, reason = single_path_consumer(
            tensor, g, lambda user, _node: _homogeneous(user)[0] or _relu6_like(user))
        if reason is not None:
            skip("fork", f"the output of {describe(op)}: {reason}")
            continue
        blocked = [t for t in through if _relu6_like(t)]
        if blocked and not relu6_to_relu:
            skip("relu6", f"{describe(blocked[0])} between {describe(op)} and {describe(second)} is ReLU6, "
                          "not positively homogeneous (relu6_to_relu=True replaces it by ReLU, changing the function)")
            continue
        if any(not _channels_last(t) for t in through):
            skip("channels", f"a channels_first layer lies between {describe(op)} and {describe(second)}")
            continue
        srule = rule_for(second)
        if srule is None and isinstance(second, (keras.layers.Activation, keras.layers.ReLU, keras.layers.ELU,
                                                 keras.layers.Softmax)):
            what = _activation_name(second.activation) if type(second) is keras.layers.Activation else type(
                second).__name__
            skip("not_homogeneous", f"{describe(op)} feeds {describe(second)} ('{what}'), which is not positively "
                                    "homogeneous")
            continue
        if srule is None or srule.input_axis is None or why_not_target(second) is not None:
            skip("not_a_target", f"{describe(op)} feeds {describe(second)}, not a conv/dense layer to equalize with")
            continue
        flattens = [i for i, t in enumerate(through) if type(t) is keras.layers.Flatten]
        flatten_shape = None
        if flattens:
            if not srule.through_flatten or len(flattens) > 1:
                skip("not_a_target", f"{describe(second)} follows a Flatten")
                continue
            before = through[flattens[0] - 1] if flattens[0] else None
            shape_source = tensor if before is None else _output_of(g, before)
            flatten_shape = tuple(shape_source.shape[1:])
            if any(d is None for d in flatten_shape):
                skip("channels", f"unknown dimensions before the Flatten into {describe(second)}")
                continue
        else:
            rank = len(_output_of(g, through[-1]).shape) if through else len(tensor.shape)
            if srule.input_axis(second, rank) != rank - 1:
                skip("channels", f"{describe(second)} reads channels on another axis than the last")
                continue
        relu6 += blocked + ([op] if own == "relu6" else [])
        linear = own == "linear" and all(_homogeneous(t)[1] for t in through)
        pairs.append(_Pair(op, second, through, linear, flatten_shape, int(tensor.shape[-1])))
    return pairs


def _output_of(g: GraphIndex, op):
    for node in g.nodes:
        if internals.node_operation(node) is op:
            return internals.node_outputs(node)[0]
    raise KeyError(op.name)


def _channel_index(apply, kernels, n: int) -> list[np.ndarray]:
    """For each kernel entry, the channel it belongs to (-1: none), found by letting the
    rule scale a kernel of ones by channel number + 2 (so the rule's own layout decides)."""
    ones = [np.ones_like(k) for k in kernels]
    marked = apply(ones, np.arange(n, dtype=np.float64) + 2.0)
    return [np.where(m == 1.0, -1, np.rint(m).astype(np.int64) - 2) for m in marked]


def _ranges(kernels, index, n: int) -> np.ndarray:
    r = np.zeros(n)
    for k, idx in zip(kernels, index):
        mask = idx >= 0
        np.maximum.at(r, idx[mask], np.abs(k[mask]))
    return r


class _State:
    """The current kernels (float64) and bias of every layer taking part."""

    def __init__(self):
        self.weights: dict[int, list[np.ndarray]] = {}
        self.layers: dict[int, keras.layers.Layer] = {}

    def get(self, layer):
        self.layers[id(layer)] = layer
        return self.weights.get(id(layer)) or [np.asarray(w) for w in layer.get_weights()]


def _input_scale(pair: _Pair, s: np.ndarray) -> np.ndarray:
    if pair.flatten_shape is None:
        return s
    return rules.per_feature(s, pair.flatten_shape, len(pair.flatten_shape) - 1, "channels_last")


def equalize_model(model: keras.Model, *, relu6_to_relu: bool = False, absorb_bias: bool = True,
                   scale: bool = True) -> tuple[keras.Model, EqualizationReport]:
    """Cross-layer equalize `model` (fold its BNs first: a BN between two layers blocks the
    pair). `model` is never changed; the result is a new model of the same layers.

    Args:
        model: A Functional or Sequential model.
        relu6_to_relu: Replace each ReLU6 on a pair's path (or as the first layer's
            activation) by ReLU so the pair can be equalized. This changes the function.
        absorb_bias: Move biases forward on activation-free paths into non-padding layers.
        scale: False only replaces the ReLU6s (the reference an equalization with
            `relu6_to_relu` is verified against).

    Returns:
        `(equalized_model, EqualizationReport)`.
    """
    report = EqualizationReport()
    relu6: list = []
    pairs = _find_pairs(model, report, relu6_to_relu, relu6)
    if not scale:
        pairs, report.skipped = [], []
    if not pairs and not relu6:
        return model, report
    state = _State()
    total: dict[int, np.ndarray] = {}
    for _ in range(_SWEEPS):
        report.sweeps += 1
        moved = 0.0
        for p in pairs:
            w1, w2 = state.get(p.first), state.get(p.second)
            r1_rule, r2_rule = rule_for(p.first), rule_for(p.second)
            n = p.n
            k1 = w1[:r1_rule.n_kernels]
            idx1 = _channel_index(lambda ks, sc: r1_rule.scale_output(p.first, ks, sc), k1, n)
            r1 = _ranges(k1, idx1, n)
            k2 = w2[:r2_rule.n_kernels]
            features = _input_scale(p, np.arange(n, dtype=np.float64))
            m = features.size

            def absorb(ks, sc):
                return r2_rule.absorb_input(p.second, ks, sc, np.zeros_like(sc))[0]
            idx2_features = _channel_index(absorb, k2, m)
            feature_channel = np.rint(features).astype(np.int64)
            idx2 = [np.where(i >= 0, feature_channel[np.clip(i, 0, m - 1)], -1) for i in idx2_features]
            r2 = _ranges(k2, idx2, n)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(n)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            moved = max(moved, float(np.max(np.abs(np.log(s)))))
            state.weights[id(p.first)] = rules.fold_backward(p.first, 1.0 / s, np.zeros(n), w1)
            scale_in = _input_scale(p, s)
            state.weights[id(p.second)] = rules.fold_forward(p.second, scale_in, np.zeros(m), w2)
            total[id(p.first)] = total.get(id(p.first), np.ones(n)) * s
        if moved < _SETTLED:
            break
    for p in pairs:
        s = total[id(p.first)]
        absorbed = False
        if absorb_bias and p.linear and rule_for(p.second).forward_blocker(p.second) is None:
            w1, w2 = state.get(p.first), state.get(p.second)
            bias = np.asarray(w1[rule_for(p.first).n_kernels], dtype=np.float64)
            if np.any(bias != 0):
                state.weights[id(p.first)] = w1[:-1] + [np.zeros_like(w1[-1])]
                m = _input_scale(p, np.zeros(bias.size)).size
                state.weights[id(p.second)] = rules.fold_forward(
                    p.second, np.ones(m), _input_scale(p, bias), w2)
                absorbed = True
        report.pairs.append(EqualizedPair(
            first=p.first.name, second=p.second.name, through=[t.name for t in p.through],
            max_scale=float(max(np.max(s), 1.0 / np.min(s))), bias_absorbed=absorbed,
            scales=s, input_scales=_input_scale(p, s)))
    plan = RebuildPlan()
    for key, weights in state.weights.items():
        plan.new_weights[key] = weights  # folded weights always carry a bias
        plan.configs[key] = rules.with_bias(state.layers[key], state.layers[key].get_config())
    for op in relu6:
        report.relu6_replaced.append(op.name)
        config = plan.configs.get(id(op)) or op.get_config()
        if type(op) is keras.layers.ReLU:
            config["max_value"] = None
        elif "activation" in config and type(op) is keras.layers.Activation:
            config["activation"] = "relu"
        else:
            inner = unwrap(op)
            if inner is op:
                config["activation"] = "relu"
            else:
                config["layer"]["config"]["activation"] = "relu"
        plan.configs[id(op)] = config
    return rebuild(model, plan), report


def equalize_verified(model: keras.Model, inputs, *, relu6_to_relu: bool = False):
    """`equalize_model`, then checked exact against `model` (or, where ReLU6 was replaced,
    against `model` with ReLU: the function asked for) on real `inputs`, like a fold
    (<= 1e-5). Returns `(equalized, report, max_rel_err)`; raises VerificationError."""
    from keras_bn_ext.compare import compare_models
    from keras_bn_ext.errors import VerificationError

    equalized, report = equalize_model(model, relu6_to_relu=relu6_to_relu)
    base = equalize_model(model, relu6_to_relu=True, scale=False)[0] if report.relu6_replaced else model
    check = compare_models(base, equalized, inputs=inputs)
    if not check.passed:
        raise VerificationError(f"cross-layer equalization changed the model's outputs by {check.max_rel_err:.3g} "
                                "relative (an exact transform should not): please report it")
    return equalized, report, check.max_rel_err
