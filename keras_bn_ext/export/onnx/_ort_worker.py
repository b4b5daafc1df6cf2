"""Run an ONNX model on onnxruntime in a process of its own.

Started as a script (`python path/to/_ort_worker.py REQUEST RESPONSE`), so it imports
neither this package nor TensorFlow: TensorFlow 2.21 loads CUDA 12 and
onnxruntime-gpu >= 1.27 CUDA 13, and the two must not meet in one process.

REQUEST is an .npz with a JSON string `__meta__` ({"model", "providers",
"input_names", "batches", "repeats", "threads", "optimizations",
"disabled_optimizers"}) and arrays `b{i}__{input name}`. RESPONSE is an
.npz with `__meta__` ({"provider", "available", "log", "latency_ms"}) and arrays
`b{i}__o{j}` in the session's output order.
"""

from __future__ import annotations

import json
import sys
import time


def main(request_path: str, response_path: str) -> int:
    import numpy as np

    with np.load(request_path, allow_pickle=False) as req:
        meta = json.loads(str(req["__meta__"]))
        batches = [
            {name: req[f"b{i}__{name}"] for name in meta["input_names"]}
            for i in range(meta["batches"])
        ]
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    for name, options in meta["providers"]:
        if name in available:
            providers.append((name, options))
    if not providers:
        providers = [("CPUExecutionProvider", {})]
    gpu = any(name != "CPUExecutionProvider" for name, _ in providers)
    preload = _preload_gpu_libraries(ort) if gpu else None
    options = ort.SessionOptions()
    if gpu:
        # Verbose while the session is created: onnxruntime then lists where every node
        # was placed (and why some went to the CPU). Quiet again for the runs.
        options.log_severity_level = 0
        ort.set_default_logger_severity(0)
    if meta.get("optimizations") is False:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if meta.get("threads"):
        options.intra_op_num_threads = int(meta["threads"])
    session = ort.InferenceSession(meta["model"], sess_options=options, providers=providers,
                                   disabled_optimizers=meta.get("disabled_optimizers") or None)
    ort.set_default_logger_severity(3)
    run_options = ort.RunOptions()
    run_options.log_severity_level = 3
    used = session.get_providers()[0]
    output_names = [o.name for o in session.get_outputs()]

    result = {}
    for i, feed in enumerate(batches):
        for j, out in enumerate(session.run(output_names, feed, run_options)):
            result[f"b{i}__o{j}"] = out

    latency = {}
    for batch_size, feed in _by_batch_size(batches).items():
        times = []
        for _ in range(int(meta.get("repeats", 0))):
            start = time.perf_counter()
            session.run(output_names, feed, run_options)
            times.append((time.perf_counter() - start) * 1e3)
        if times:
            latency[str(batch_size)] = sorted(times)[len(times) // 2]

    node_ms = _profile(ort, meta, providers, batches[0], output_names) if meta.get("profile") else None

    out_meta = {
        "node_ms": node_ms,
        "provider": used,
        "available": available,
        "output_names": output_names,
        "latency_ms": latency,
        "version": ort.__version__,
        "preload": preload,
    }
    np.savez(response_path, __meta__=np.array(json.dumps(out_meta)), **result)
    return 0


def _profile(ort, meta, providers, feed, output_names) -> dict:
    """Mean time per node over `profile` runs of the first batch, from onnxruntime's own
    profiler: {node name: {"op": op type, "ms": milliseconds}}."""
    import os
    import tempfile

    options = ort.SessionOptions()
    if meta.get("threads"):
        options.intra_op_num_threads = int(meta["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(meta["model"], sess_options=options, providers=providers)
        runs = int(meta["profile"])
        for _ in range(runs):
            session.run(output_names, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    total: dict = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        row = total.setdefault(name, {"op": event.get("args", {}).get("op_name", ""), "ms": 0.0})
        row["ms"] += event.get("dur", 0) / 1e3 / runs
    return total


def _preload_gpu_libraries(ort) -> dict:
    """onnxruntime.preload_dlls() (onnxruntime-gpu >= 1.21) loads the CUDA and cuDNN
    libraries that `pip install onnxruntime-gpu[cuda,cudnn]` puts in site-packages, which
    the loader does not search by itself. What it prints and any error it raises are
    kept for the fallback reason; it never stops the run."""
    import contextlib
    import io

    if not hasattr(ort, "preload_dlls"):
        return {"called": False, "error": None, "messages": []}
    printed = io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(printed):
            ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - a failed preload is a reason, not a crash
        error = f"{type(exc).__name__}: {exc}"
    return {"called": True, "error": error, "messages": printed.getvalue().strip().splitlines()}


def _by_batch_size(batches):
    seen = {}
    for feed in batches:
        first = next(iter(feed.values()))
        seen.setdefault(int(first.shape[0]), feed)
    return seen


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
