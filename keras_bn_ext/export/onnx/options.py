"""What the ONNX export and its verification accept, shared by the library and
`bn-export-onnx` (this module imports nothing heavy: the CLI prints these in --help)."""

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

# The ONNX graph computes the same float32 operations in another order (other conv
# algorithms, fused bias): a few ulp per layer, ~1e-7 of the output's magnitude on
# small nets and ~1e-6 on ResNet-sized ones. 1e-5 absolute and relative keep a
# margin and still catch a changed weight, which errs by O(1e-2) or more.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# float16 keeps 11 significant bits (unit roundoff 4.9e-4) in every weight and
# intermediate; over tens of layers that reaches ~1e-3 of the output's magnitude
# (measured 6e-5 on LeNet, 7e-4 on MobileNetV2).
FP16_ATOL = 1e-3
FP16_RTOL = 1e-2
SAMPLES = 3
BATCH_SIZES = (1, 8)
