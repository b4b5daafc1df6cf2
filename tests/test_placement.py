"""Node placement read from onnxruntime's own log lines (formats of onnxruntime 1.31's
session_state.cc, transformer_memcpy.cc, fallback_cpu_capability.cc and the CUDA EP)."""

import subprocess
import sys

import pytest

from keras_bn_ext.export.onnx.placement import parse_placement

V = "2026-11-28 06:02:30.555126519 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp] "
I = "2026-11-28 06:02:30.540000000 [I:onnxruntime:, cuda_execution_provider.cc:2580 GetCapability] "
W = "\x1b[0;93m2026-11-28 06:02:30.541000000 [W:onnxruntime:, transformer_memcpy.cc:74 ApplyImpl] "

UNET_LOG = "\n".join([
    W + "Dropping the ConvTranspose node: up/conv2d_transpose to CPU because it requires asymmetric "
        "padding which the CUDA EP currently does not support",
    I + "ORT optimization- Force fallback to CPU execution for node: shape/Shape because the CPU execution "
        "path is deemed faster than overhead involved with execution on other EPs  capable of executing this node",
    W + "2 Memcpy nodes are added to the graph main_graph for CUDAExecutionProvider. It might have negative "
        "impact on performance (including unable to run CUDA graph).",
    V + "Node placements",
    V + " Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2",
    V + "  ConvTranspose (up/conv2d_transpose)",
    V + "  Shape (shape/Shape)",
    V + " Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 30",
    V + "  Conv (down/conv2d)",
    V + "  MemcpyFromHost (Memcpy)",
    V + "  MemcpyToHost (Memcpy_token_1)",
    "2026-11-28 06:02:30.56 [I:onnxruntime:, inference_session.cc:2100 Initialize] Session successfully initialized.",
])


def test_cpu_nodes_with_onnxruntimes_reasons_and_memcpy_count():
    placement = parse_placement(UNET_LOG)
    assert placement.nodes_per_provider == {"CPUExecutionProvider": 2, "CUDAExecutionProvider": 30}
    assert placement.memcpy_nodes == 2
    by_name = {n.name: n for n in placement.cpu_nodes}
    assert set(by_name) == {"up/conv2d_transpose", "shape/Shape"}
    assert by_name["up/conv2d_transpose"].compute and "asymmetric padding" in by_name["up/conv2d_transpose"].reason
    assert not by_name["shape/Shape"].compute  # onnxruntime's deliberate choice
    assert [n.name for n in placement.cpu_compute_nodes] == ["up/conv2d_transpose"]
    assert placement.to_dict()["cpu_compute_nodes"] == 1


def test_kernel_not_found_is_the_reason():
    log = "\n".join([
        I + "CUDA kernel not found in registries for Op type: GridSample node name: sampler/grid",
        V + " Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 5",
        V + "  Conv (c)",
        V + " Node(s) placed on [CPUExecutionProvider]. Number of nodes: 1",
        V + "  GridSample (sampler/grid)",
    ])
    (node,) = parse_placement(log).cpu_nodes
    assert node.op_type == "GridSample" and node.compute and "kernel not found" in node.reason


def test_all_nodes_on_one_provider_and_no_section():
    placement = parse_placement(V + " All nodes placed on [CUDAExecutionProvider]. Number of nodes: 52")
    assert placement.nodes_per_provider == {"CUDAExecutionProvider": 52} and placement.cpu_nodes == []
    assert parse_placement("nothing about placements here") is None


def test_a_real_verbose_onnxruntime_log_parses(tmp_path):
    # As the worker asks: CUDA first (here it cannot load, so all nodes land on the CPU).
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "relu.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))
    code = ("import onnxruntime as ort, sys\n"
            "o = ort.SessionOptions(); o.log_severity_level = 0; ort.set_default_logger_severity(0)\n"
            "ort.InferenceSession(sys.argv[1], o, providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])\n")
    log = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True).stderr
    placement = parse_placement(log)
    assert placement.nodes_per_provider == {"CPUExecutionProvider": 1}
