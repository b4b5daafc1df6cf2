"""Run a LiteRT model on ai-edge-litert's interpreter, in a process of its own.

Started as a script (`python path/to/_litert_worker.py REQUEST RESPONSE`), so it imports
neither this package nor TensorFlow (TensorFlow carries a LiteRT runtime of its own; the two
never share a process). REQUEST is an .npz with a JSON `__meta__` ({"model", "signature",
"input_names", "batches", "repeats"}) and arrays `b{i}__{input name}`; each batch is fed by
name through the signature runner, which resizes the dynamic batch. RESPONSE: `__meta__`
({"output_names", "version", "latency_ms", "input_shapes"}) and arrays `b{i}__{output name}`.
"""

from __future__ import annotations

import json
import sys
import time


def main(request_path: str, response_path: str) -> int:
    import numpy as np
    from ai_edge_litert import interpreter as litert

    with np.load(request_path, allow_pickle=False) as req:
        meta = json.loads(str(req["__meta__"]))
        batches = [{n: req[f"b{i}__{n}"] for n in meta["input_names"]} for i in range(meta["batches"])]
    interp = litert.Interpreter(model_path=meta["model"])
    runner = interp.get_signature_runner(meta["signature"])
    details = interp.get_signature_list()[meta["signature"]]
    result, latency = {}, {}
    for i, feed in enumerate(batches):
        out = runner(**feed)
        for name, value in out.items():
            result[f"b{i}__{name}"] = np.array(value)
    for feed in batches:
        size = int(next(iter(feed.values())).shape[0])
        if str(size) in latency or not meta.get("repeats"):
            continue
        times = []
        for _ in range(int(meta["repeats"])):
            start = time.perf_counter()
            runner(**feed)
            times.append((time.perf_counter() - start) * 1e3)
        latency[str(size)] = sorted(times)[len(times) // 2]
    try:
        from importlib.metadata import version

        v = version("ai-edge-litert")
    except Exception:  # noqa: BLE001
        v = ""
    ops = {}  # the file's own ops, before the default (XNNPACK) delegate takes them
    plain = litert.Interpreter(model_path=meta["model"],
                               experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    # `_get_ops_details` is the interpreter's only op listing, and private: where a release
    # drops or changes it, the op counts are left empty (they describe, they judge nothing).
    try:
        for d in plain._get_ops_details():
            ops[d["op_name"]] = ops.get(d["op_name"], 0) + 1
    except Exception:  # noqa: BLE001
        ops = {}
    out_meta = {"output_names": list(details["outputs"]), "input_names": list(details["inputs"]),
                "version": v, "latency_ms": latency, "op_counts": dict(sorted(ops.items()))}
    np.savez(response_path, __meta__=np.array(json.dumps(out_meta)), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
