"""The parent's side of a target's runner: batches go to a worker script in a child process
(its runtime never shares a process with TensorFlow), outputs come back by name.

The protocol, for every worker (`python WORKER.py REQUEST RESPONSE`): REQUEST is an .npz with
a JSON `__meta__` ({"model", "input_names", "batches", "repeats", ...}) and arrays
`b{i}__{input name}`; RESPONSE is an .npz with `__meta__` ({"input_names", "output_names",
"version", "latency_ms", "op_counts", ...}) and arrays `b{i}__{output name}`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from keras_bn_ext.errors import VerificationError

__all__ = ["run_worker"]


def run_worker(worker: str, path: str | os.PathLike, batches: Sequence[Mapping[str, np.ndarray]], *,
               keras_names: Sequence[str], runtime: str, repeats: int = 0,
               meta: Mapping | None = None) -> tuple[list[list[np.ndarray]], dict]:
    """Run `worker` on the file at `path` over `batches`; outputs per batch in `keras_names`
    order and the worker's meta. The file's input and output names must be Keras's."""
    input_names = list(batches[0])
    request_meta = {"model": str(Path(path).resolve()), "input_names": input_names, "batches": len(batches),
                    "repeats": repeats, **(meta or {})}
    arrays = {f"b{i}__{n}": np.ascontiguousarray(b[n]) for i, b in enumerate(batches) for n in input_names}
    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_run_") as tmp:
        request, response = os.path.join(tmp, "request.npz"), os.path.join(tmp, "response.npz")
        np.savez(request, __meta__=np.array(json.dumps(request_meta)), **arrays)
        proc = subprocess.run([sys.executable, worker, request, response], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise VerificationError(f"{runtime} failed on {path}: {last[:400]}")
        with np.load(response, allow_pickle=False) as res:
            out_meta = json.loads(str(res["__meta__"]))
            if sorted(out_meta["output_names"]) != sorted(keras_names) or \
                    sorted(out_meta["input_names"]) != sorted(input_names):
                raise VerificationError(
                    f"the file's names {out_meta['input_names']} -> {out_meta['output_names']} (on {runtime}) are "
                    f"not the Keras names {input_names} -> {list(keras_names)}")
            outputs = [[res[f"b{i}__{n}"] for n in keras_names] for i in range(len(batches))]
    return outputs, out_meta
