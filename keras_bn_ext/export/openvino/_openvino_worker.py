"""Run an OpenVINO IR on OpenVINO's CPU runtime, in a process of its own (the protocol of
`export.runner`). Started as a script, so it imports neither this package nor TensorFlow.
float32 inference is asked for explicitly (`INFERENCE_PRECISION_HINT=f32`): on CPUs with
bf16 or AMX, OpenVINO's default runs float32 models in bfloat16."""

from __future__ import annotations

import json
import sys
import time


def main(request_path: str, response_path: str) -> int:
    import numpy as np
    import openvino as ov

    with np.load(request_path, allow_pickle=False) as req:
        meta = json.loads(str(req["__meta__"]))
        batches = [{n: req[f"b{i}__{n}"] for n in meta["input_names"]} for i in range(meta["batches"])]
    core = ov.Core()
    model = core.read_model(meta["model"])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": meta.get("precision", "f32")})
    outputs = [(port, port.get_any_name()) for port in compiled.outputs]
    request = compiled.create_infer_request()
    result, latency = {}, {}
    for i, feed in enumerate(batches):
        got = request.infer(feed)
        for port, name in outputs:
            result[f"b{i}__{name}"] = np.array(got[port])
    for feed in batches:
        size = str(int(next(iter(feed.values())).shape[0]))
        if size in latency or not meta.get("repeats"):
            continue
        times = []
        for _ in range(int(meta["repeats"])):
            start = time.perf_counter()
            request.infer(feed)
            times.append((time.perf_counter() - start) * 1e3)
        latency[size] = sorted(times)[len(times) // 2]
    ops = {}
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind not in ("Parameter", "Result", "Constant"):
            ops[kind] = ops.get(kind, 0) + 1
    out_meta = {"output_names": [name for _, name in outputs],
                "input_names": [port.get_any_name() for port in compiled.inputs],
                "version": ov.__version__.split("-")[0], "latency_ms": latency, "op_counts": dict(sorted(ops.items())),
                "precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}
    np.savez(response_path, __meta__=np.array(json.dumps(out_meta)), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
