"""`quantize_model`: a float Keras model made into its quantization-aware twin.

What is fused comes from folding's graph analysis (`folding.analysis.analyze`): every BN
that folds backward into a Dense/Conv/DepthwiseConv becomes, with that layer, one
`QuantizedConv`; every other such layer is a `QuantizedConv` without a BN. Activations are
fake-quantized where the export writes QuantizeLinear/DequantizeLinear pairs:

- the input of every quantized layer (unless the tensor is quantized already),
- the output of every quantized layer, after the ReLU/ReLU6 that follows it when there is
  one (unsigned: onnxruntime then folds the ReLU into the quantization), unless that
  output is a model output (logits stay float, as onnxruntime's MatMulIntegerToFloat
  gives them).

Between those points the network runs in float on dequantized values, in training as in
the file, so the placement is the same on both sides by construction.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.data import model_arrays
from keras_bn_ext.graph import GraphIndex, graph_of
from keras_bn_ext.qat.activation import ActivationQuantizer
from keras_bn_ext.qat.conv import SUPPORTED, QuantizedConv
from keras_bn_ext.qat.equalize import equalize_unfolded
from keras_bn_ext.qat.options import EQUALIZE, TARGETS, WEIGHT_BITS, check_target_bits
from keras_bn_ext.qat.pairs import fused_pairs
from keras_bn_ext.rebuild import RebuildPlan, rebuild

__all__ = ["quantize_model", "quantizers_of", "is_qat_model", "TARGETS"]

CALIBRATION_BATCH = 256


def _is_relu(op) -> bool:
    if isinstance(op, keras.layers.ReLU):
        return op.negative_slope == 0 and op.threshold == 0
    if isinstance(op, keras.layers.Activation):
        return keras.activations.serialize(op.activation) in ("relu", "relu6")
    return False


def _batchnorm_config(bn) -> dict:
    """The config of this package's BN with `bn`'s settings (Keras's BN or ours)."""
    config = bn.get_config()
    keep = ("axis", "momentum", "epsilon", "center", "scale", "synchronized", "name")
    return {k: config[k] for k in keep if k in config}


class _Builder:
    """The replacement callables the rebuild calls, and the quantizers they create."""

    def __init__(self, model, *, weight_bits, per_channel, reduce_range, bn_freeze_after):
        self.weight_bits, self.per_channel, self.bn_freeze_after = weight_bits, per_channel, bn_freeze_after
        self.reduce_range = reduce_range
        graph = graph_of(model)
        self.g = GraphIndex(graph)
        self.quantized: set[int] = set()  # id() of symbolic tensors a quantizer produced
        self.count = 0
        self.pairs = pairs = fused_pairs(model)
        self.fused_bn = {id(bn) for bn in pairs.values()}
        # Where each quantized layer's output ends: the BN (fused), then a ReLU after it.
        self.after: dict[int, object] = {}  # id(layer) -> the ReLU layer whose output is quantized
        for node in self.g.nodes:
            op = internals.node_operation(node)
            if type(op) not in SUPPORTED or internals.node_is_input(node):
                continue
            out = internals.node_outputs(node)[0]
            if id(op) in pairs:
                out = self._only_consumer_output(out)
            if out is None or id(out) in self.g.output_ids:
                continue
            users = self.g.consumers.get(id(out), [])
            if len(users) == 1 and _is_relu(internals.node_operation(users[0])) \
                    and self.g.calls.get(id(internals.node_operation(users[0])), 0) == 1:
                self.after[id(op)] = internals.node_operation(users[0])

    def _only_consumer_output(self, tensor):
        users = self.g.consumers.get(id(tensor), [])
        return internals.node_outputs(users[0])[0] if len(users) == 1 else None

    def quantizer(self, *, unsigned=False):
        self.count += 1
        return ActivationQuantizer(unsigned=unsigned, name=f"act_quant_{self.count}")

    def mark(self, tensor):
        self.quantized.add(id(tensor))
        return tensor

    def wants(self, op) -> bool:
        return id(op) in self.fused_bn or type(op) in SUPPORTED or any(v is op for v in self.after.values())

    def replacement(self, op):
        if id(op) in self.fused_bn:
            return lambda x, *args, **kwargs: x  # inside the QuantizedConv
        if type(op) in SUPPORTED:
            return self._quantized_layer(op)
        relu_of = next((k for k, v in self.after.items() if v is op), None)
        if relu_of is not None:
            return self._relu(op)
        return None

    def _relu(self, op):
        copy = type(op).from_config(op.get_config())
        quant = self.quantizer(unsigned=True)
        return lambda x, *args, **kwargs: self.mark(quant(copy(x)))

    def _quantized_layer(self, op):
        bn = self.pairs.get(id(op))
        fused = QuantizedConv(keras.saving.serialize_keras_object(op),
                              _batchnorm_config(bn) if bn is not None else None, weight_bits=self.weight_bits,
                              per_channel=self.per_channel, reduce_range=self.reduce_range,
                              bn_freeze_after=self.bn_freeze_after,
                              name=op.name)
        input_quant, output_quant = {}, None
        if id(op) not in self.after:
            output_quant = self.quantizer()
        ends_at_output = self._ends_at_output(op)

        def call(x, *args, **kwargs):
            if id(x) not in self.quantized:
                if id(x) not in input_quant:
                    input_quant[id(x)] = self.quantizer()
                x = self.mark(input_quant[id(x)](x))
            first = not fused.built
            y = fused(x)
            if first:
                fused.inner.set_weights(op.get_weights())
                if bn is not None:
                    fused.batchnorm.set_weights(_bn_weights(bn, fused.batchnorm))
            if output_quant is not None and not ends_at_output:
                y = self.mark(output_quant(y))
            return y

        return call

    def _ends_at_output(self, op) -> bool:
        for node in self.g.nodes:
            if internals.node_operation(node) is op:
                out = internals.node_outputs(node)[0]
                if id(op) in self.pairs:
                    out = self._only_consumer_output(out)
                return out is None or id(out) in self.g.output_ids
        return True


def _bn_weights(bn, ours) -> list[np.ndarray]:
    """`bn`'s gamma, beta, moving mean and variance in the order `ours` holds them."""
    values = {"gamma": getattr(bn, "gamma", None), "beta": getattr(bn, "beta", None),
              "moving_mean": bn.moving_mean, "moving_variance": bn.moving_variance}
    return [np.asarray(keras.ops.convert_to_numpy(values[v.path.split("/")[-1]])) for v in ours.weights]


def quantizers_of(model: keras.Model) -> list[ActivationQuantizer]:
    return [layer for layer in internals.all_sublayers(model) if isinstance(layer, ActivationQuantizer)]


def is_qat_model(model: keras.Model) -> bool:
    """Whether `model` was made by `quantize_model` (it holds QAT layers)."""
    return any(isinstance(layer, (ActivationQuantizer, QuantizedConv)) for layer in internals.all_sublayers(model))


def quantize_model(model: keras.Model, *, calibration, weight_bits: int = 8, per_channel: bool = True,
                   activation_bits: int = 8, target: str = "onnx", target_cpu: str = "auto",
                   bn_freeze_after: int | None = None, equalize: str = "auto",
                   batch_size: int = CALIBRATION_BATCH) -> keras.Model:
    """The quantization-aware twin of `model` (which is never changed).

    Args:
        model: A trained Functional or Sequential model.
        calibration: Real inputs the activation ranges start from (their min/max), so that
            the untrained twin computes what post-training quantization computes: an array,
            a list in input order or a dict by input name (checked: shapes, dtypes, NaN).
        weight_bits: 8 or 4 (symmetric, narrow range: [-127, 127] or [-7, 7]).
        per_channel: One weight scale per output channel.
        activation_bits: 8 (uint8, asymmetric).
        target: The runtime whose INT8 graph it simulates: "onnx" (onnxruntime's QDQ graph,
            which the openvino target compiles too) or "litert" (TensorFlow's LiteRT
            converter; 8-bit weights only).
        target_cpu: The CPU the ONNX file is for ("auto": this one; `export.onnx.cpu`): 8-bit
            weights are trained on 7 bits where its integer kernels need it (no VNNI).
        bn_freeze_after: Training steps after which the fused BN statistics freeze.
        equalize: "auto" (on with one weight scale per tensor, as for post-training
            quantization), "on" or "off": cross-layer equalization applied to the model with
            its BNs in place (`qat.equalize`), checked exact on the calibration data.
        batch_size: Calibration batch size.

    Returns:
        A Functional model that trains with `model.fit` and saves to `.keras`.

    Raises:
        InputDataError: calibration data that does not fit the model.
        UnsupportedModelError: nothing to quantize.
        ValueError: an argument out of its range.
    """
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}. Received: weight_bits={weight_bits!r}")
    if activation_bits != 8:
        raise ValueError(f"activation_bits must be 8. Received: activation_bits={activation_bits!r}")
    check_target_bits(target, weight_bits)
    if equalize not in EQUALIZE:
        raise ValueError(f"equalize must be one of {EQUALIZE}. Received: equalize={equalize!r}")
    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    arrays = model_arrays(model, calibration, source="calibration data")
    if equalize == "on" or (equalize == "auto" and not per_channel):
        model, _ = equalize_unfolded(model, fused_pairs(model), [a[:batch_size] for a in arrays])
    from keras_bn_ext.export.onnx.cpu import cpu_target

    # 7-bit weights where onnxruntime's integer kernels need them (no VNNI); LiteRT's
    # kernels take the full int8 range.
    reduce_range = target == "onnx" and weight_bits == 8 and cpu_target(target_cpu).reduce_range
    builder = _Builder(model, weight_bits=weight_bits, per_channel=per_channel, reduce_range=reduce_range,
                       bn_freeze_after=bn_freeze_after)
    plan = RebuildPlan()
    for layer in internals.all_sublayers(model):
        if builder.wants(layer):
            plan.replace[id(layer)] = builder.replacement
    qat = rebuild(model, plan)
    if not any(isinstance(layer, QuantizedConv) for layer in qat.layers):
        from keras_bn_ext.errors import UnsupportedModelError

        raise UnsupportedModelError(f"model '{model.name}' has no Dense/Conv/DepthwiseConv layer to quantize")
    calibrate(qat, arrays, batch_size=batch_size)
    return qat


def calibrate(qat: keras.Model, calibration, *, batch_size: int = CALIBRATION_BATCH) -> None:
    """Set every activation range to its min/max over `calibration` (float weights)."""
    arrays = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration]
    quantizers = quantizers_of(qat)
    for q in quantizers:
        q.observing, q.observed = True, []
    try:
        structure = internals.inputs_struct(graph_of(qat))  # the inputs as the model takes them
        for start in range(0, len(arrays[0]), batch_size):
            qat(keras.tree.pack_sequence_as(structure, [a[start:start + batch_size] for a in arrays]), training=False)
    finally:
        for q in quantizers:
            q.observing = False
    for q in quantizers:
        if q.observed:
            q.set_range(min(lo for lo, _ in q.observed), max(hi for _, hi in q.observed))
            q.observed = []
