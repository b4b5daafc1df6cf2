"""Keep onnxruntime's graph optimizer from rewriting an exported graph into a wrong one.

onnxruntime (1.31 and earlier) has a rewrite, `Pad_Fusion`, that moves a constant Pad
whose value is zero into the next MaxPool's `pads` attribute. MaxPool pads with -inf,
not zero, so every border window whose real values are all negative changes from 0 to
their maximum (ResNet50V2's stem: ZeroPadding2D -> MaxPooling2D after a conv). The same
bug lives in onnx-optimizer's `fuse_pad_into_pool` (onnx/optimizer#318, onnxsim#290).

The exported graph is right; a default onnxruntime session makes it wrong. So each zero
Pad that feeds a MaxPool is given a form the rewrite does not take and that computes the
same numbers:

- its pad value becomes -0.0 (explicit): onnxruntime only fuses a pad value whose bytes
  are all zero, and -0.0 equals 0.0 in every comparison and sum, so MaxPool, and all that
  follows, gives the same values (a window of only negative values now yields -0.0);
- from opset 18, it also names its `axes` (all of them): onnxruntime does not fuse a Pad
  with an `axes` input.
"""

from __future__ import annotations

import numpy as np

__all__ = ["guard_pad_into_maxpool"]

# Ops that only move data: onnxruntime's transpose optimizer can push them out of the way,
# so a zero Pad behind them may still end up next to the MaxPool.
_LAYOUT_OPS = {"Transpose", "Identity"}
_AXES_INPUT_OPSET = 18


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _constant_values(proto) -> dict:
    import onnx

    # Pads and shapes are small: weights are neither copied nor read from external data.
    values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
              if int(np.prod(i.dims)) <= 4096 and i.data_location != onnx.TensorProto.EXTERNAL}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _feeds_maxpool(name: str, consumers: dict) -> bool:
    for node in consumers.get(name, ()):
        if node.op_type == "MaxPool":
            return True
        if node.op_type in _LAYOUT_OPS and _feeds_maxpool(node.output[0], consumers):
            return True
    return False


def _elem_types(proto, names: set) -> dict:
    """The element type of each named tensor, from onnx's shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    known = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in known if v.name in names}
    types.update({i.name: i.data_type for i in proto.graph.initializer if i.name in names})
    return types


def guard_pad_into_maxpool(proto) -> list[str]:
    """Rewrite, in place, each zero constant Pad of `proto` that feeds a MaxPool (directly
    or through Transpose/Identity) into the equivalent form onnxruntime's `Pad_Fusion`
    leaves alone. Returns one line per Pad changed."""
    import onnx

    consumers: dict = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constant_values(proto)
    candidates = []
    for node in proto.graph.node:
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx"):
            continue
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        if mode != "constant" or len(node.input) < 2 or not _feeds_maxpool(node.output[0], consumers):
            continue
        value_name = node.input[2] if len(node.input) > 2 else ""
        if value_name:
            value = constants.get(value_name)
            if value is None or value.size != 1 or value.reshape(()) != 0 or np.signbit(value.reshape(())):
                continue  # not a constant zero (or already -0.0)
        candidates.append(node)
    if not candidates:
        return []

    types = _elem_types(proto, {n.input[0] for n in candidates})
    with_axes = _opset(proto) >= _AXES_INPUT_OPSET
    guarded = []
    for node in candidates:
        elem_type = types.get(node.input[0])
        if not elem_type:
            continue  # unknown type: no value of the right type to give it
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        value_name = f"{node.name or node.output[0]}__minus_zero"
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(-0.0, dtype), value_name))
        inputs = [node.input[0], node.input[1], value_name]
        pads = constants.get(node.input[1])
        if with_axes and len(node.input) < 4 and pads is not None:
            axes_name = f"{node.name or node.output[0]}__axes"
            proto.graph.initializer.append(
                onnx.numpy_helper.from_array(np.arange(pads.size // 2, dtype=np.int64), axes_name))
            inputs.append(axes_name)
        elif len(node.input) > 3:
            inputs.append(node.input[3])
        del node.input[:]
        node.input.extend(inputs)
        guarded.append(f"Pad '{node.name}' before a MaxPool: pad value -0.0"
                       + (", axes named" if len(inputs) > 3 else "")
                       + " (onnxruntime's Pad_Fusion would pad with -inf instead of 0)")
    return guarded
