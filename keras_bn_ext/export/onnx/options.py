"""What the ONNX export and its verification accept, shared by the library and
`bn-export-onnx` (this module imports nothing heavy: the CLI prints these in --help)."""

from dataclasses import dataclass

# The tolerances and sample counts every target shares (re-exported: the ONNX CLI prints them).
from keras_bn_ext.export.options import BATCH_SIZES, FP16_ATOL, FP16_RTOL, FP32_ATOL, FP32_RTOL, SAMPLES

__all__ = ["BATCH_DIM", "BATCH_SIZES", "CONVERSIONS", "DEFAULT_METHOD", "DEFAULT_OPSET", "INT4_OPSET", "EXTERNAL_DATA_THRESHOLD", "FP16_ATOL", "FP16_RTOL", "FP32_ATOL",
           "FP32_RTOL", "METHODS", "OnnxInt8Options", "OnnxOptions", "PROVIDERS", "SAMPLES", "SUPPORTED_OPSETS"]

# tf2onnx 1.17 converts to opsets up to 18 (19+ "not supported yet"); 13 is the oldest
# with the per-axis quantization and Split semantics its Keras 3 paths emit.
SUPPORTED_OPSETS = range(13, 19)
DEFAULT_OPSET = 17
BATCH_DIM = "batch"  # the name of the symbolic batch dimension

# How tf2onnx meets the weights: "structure" converts the model traced with its kernels
# as inputs and attaches their values after (export.onnx.structure); "frozen" is tf2onnx's
# own route (every variable frozen into the graph: ~260 bytes of memory per parameter).
CONVERSIONS = ("structure", "frozen")
# A protobuf cannot exceed 2 GiB: above this much weight data the initializers go to an
# external-data file beside the model (always with --external-data).
EXTERNAL_DATA_THRESHOLD = 1 << 30

# auto = CUDA when onnxruntime can really use it, else the CPU.
PROVIDERS = ("auto", "cuda", "cpu")



# onnxruntime's calibration methods (CalibrationMethod names). Measured on the trained nets of
# tests/fixtures/int8 (BENCHMARKS.md section 8, 512 calibration digits): Percentile was best on
# both LeNets and 0.15 pt below MinMax/Entropy on the depthwise-separable net (all three within
# 0.3 pt of float there), so it is the default.
METHODS = ("Percentile", "MinMax", "Entropy")
DEFAULT_METHOD = "Percentile"



@dataclass(frozen=True)
class OnnxOptions:
    """What only the ONNX target has (`ExportOptions` holds what every target shares).

    Args:
        opset: ONNX opset, one of `SUPPORTED_OPSETS`.
        conversion: How tf2onnx meets the weights, one of `CONVERSIONS`.
        external_data: Weights in `OUT.onnx.data` (None: above `EXTERNAL_DATA_THRESHOLD`).
        provider: onnxruntime's execution provider, one of `PROVIDERS`.
        require_gpu: Raise GPUUnavailableError when onnxruntime falls back to the CPU.
        require_all_gpu: Also when any compute node was placed on the CPU.
    """

    opset: int = DEFAULT_OPSET
    conversion: str = "structure"
    external_data: bool | None = None
    provider: str = "auto"
    require_gpu: bool = False
    require_all_gpu: bool = False

    def __post_init__(self):
        if self.opset not in SUPPORTED_OPSETS:
            raise ValueError(f"opset must be in {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}. "
                             f"Received: opset={self.opset!r}")
        if self.conversion not in CONVERSIONS:
            raise ValueError(f"conversion must be one of {CONVERSIONS}. Received: conversion={self.conversion!r}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}. Received: provider={self.provider!r}")


INT4_OPSET = 21  # DequantizeLinear takes int4 from this opset on (tf2onnx writes at most 18)


@dataclass(frozen=True)
class OnnxInt8Options:
    """What only the ONNX target's INT8 has (the driver's `Int8Options` holds the rest).

    Args:
        per_channel: One weight scale per output channel (else one per tensor; then
            equalization is on by default: one range must serve every channel).
        method: onnxruntime's calibration method, one of `METHODS`.
        target_cpu: The CPU the file is for ("auto": this one; see `export.onnx.cpu`).
        preprocess: Pass the float graph through onnxruntime's `quant_pre_process` first.
        batch_size: Fix the batch dimension (None: symbolic).
        weight_bits: 8, or 4 (int4 weights at opset 21, each clipped to its MSE-optimal
            range first: `export.onnx.clip`).
    """

    per_channel: bool = True
    method: str = DEFAULT_METHOD
    target_cpu: str = "auto"
    preprocess: bool = True
    batch_size: int | None = None  # fix the batch dimension of the graph that is quantized
    weight_bits: int = 8

    def __post_init__(self):
        if self.weight_bits not in (8, 4):
            raise ValueError(f"weight_bits must be 8 or 4. Received: weight_bits={self.weight_bits!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}. Received: method={self.method!r}")
        from keras_bn_ext.export.onnx.cpu import TARGETS

        if self.target_cpu not in TARGETS:
            raise ValueError(f"target_cpu must be one of {TARGETS}. Received: target_cpu={self.target_cpu!r}")
