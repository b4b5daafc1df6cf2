"""GPU check for a machine with JAX + CUDA, onnx and CPU onnxruntime but no TensorFlow.

Two steps:

  python tools/gpu_check.py prepare DIR     # here, with TensorFlow: models + reference
  KERAS_BACKEND=jax python tools/gpu_check.py check DIR --out report.json   # on the GPU

`prepare` writes, for the seed's LeNet-BN (keras_bn_ext BN) and MobileNetV2 (both with
randomized BN statistics): MODEL.keras, MODEL.folded.keras (bn-fold's API),
MODEL.onnx (bn-export-onnx's API), inputs and the TensorFlow CPU float32 outputs.

`check` loads the original and folded .keras files through Keras's JAX backend, runs
them on the GPU with TF32 off ("highest" matmul precision) and on ("tensorfloat32"),
and compares with the CPU reference, with each other and with the ONNX model on
onnxruntime's CPU provider. It also runs each ONNX model through keras_bn_ext's own
onnxruntime worker on the CUDA provider (TF32 off and on; onnxruntime-gpu carried onto
the machine as ../shared/notes/gpu-onnxruntime.md describes), with the provider that
really ran, the nodes onnxruntime placed on the CPU and the Memcpy nodes it added; when
onnxruntime-gpu is not there it says so and runs the rest. It prints and writes a JSON
report; exit 1 when a TF32-off comparison exceeds 1e-5 relative, or when JAX sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

MODELS = ("lenet", "mobilenetv2")
# float32 with TF32 off: the GPU's conv/matmul algorithms reorder sums, ~1e-6 of the
# output's magnitude. TF32 keeps 10 mantissa bits (~5e-4 per product), so only
# reported, not judged.
RTOL_FP32 = 1e-5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def prepare(directory: str) -> None:
    import keras

    from keras_bn_ext import ExportOptions, export_onnx, fold_batchnorms, lenet_bn
    from keras_bn_ext.testing import randomize_batchnorms

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    builds = {
        "lenet": (lenet_bn, (16, 28, 28, 1)),
        "mobilenetv2": (
            lambda: keras.applications.MobileNetV2(
                weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None
            ),
            (8, 64, 64, 3),
        ),
    }
    for name, (build, shape) in builds.items():
        model = build()
        randomize_batchnorms(model, seed=3)
        folded, report = fold_batchnorms(model)
        model.save(os.path.join(directory, f"{name}.keras"))
        folded.save(os.path.join(directory, f"{name}.folded.keras"))
        export_onnx(folded, os.path.join(directory, f"{name}.onnx"), options=ExportOptions(fold=False))  # folded above
        x = rng.standard_normal(shape).astype("float32")
        y = keras.ops.convert_to_numpy(model(x, training=False))
        np.savez(os.path.join(directory, f"{name}.data.npz"), x=x, y=y)
        print(f"{name}: {report.bn_folded} BN folded; wrote {name}.keras/.folded.keras/.onnx/.data.npz")


def check(directory: str, out: str | None) -> int:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras
    import onnxruntime as ort

    import keras_bn_ext  # noqa: F401  registers the layer used by the original models

    devices = jax.devices()
    result = {
        "backend": keras.backend.backend(),
        "jax": jax.__version__,
        "keras": keras.__version__,
        "onnxruntime": ort.__version__,
        "devices": [str(d) for d in devices],
        "models": {},
    }
    on_gpu = devices[0].platform == "gpu"
    ok = on_gpu
    for name in MODELS:
        data = np.load(os.path.join(directory, f"{name}.data.npz"))
        x, reference = data["x"], data["y"]
        session = ort.InferenceSession(os.path.join(directory, f"{name}.onnx"), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
        entry = {"onnx_cpu_vs_tf_cpu": _rel(onnx_out, reference)}
        for variant in ("original", "folded"):
            suffix = "" if variant == "original" else ".folded"
            model = keras.saving.load_model(os.path.join(directory, f"{name}{suffix}.keras"))
            for tf32, precision in (("off", "highest"), ("on", "tensorfloat32")):
                with jax.default_matmul_precision(precision):
                    forward = jax.jit(lambda a: model(a, training=False))
                    y = np.asarray(forward(x))
                    start = time.perf_counter()
                    for _ in range(20):
                        forward(x).block_until_ready()
                    ms = (time.perf_counter() - start) / 20 * 1e3
                key = f"{variant}_tf32_{tf32}"
                entry[key] = {
                    "vs_tf_cpu_reference": _rel(y, reference),
                    "vs_onnx": _rel(y, onnx_out),
                    "latency_ms": ms,
                }
                if tf32 == "off" and max(entry[key]["vs_tf_cpu_reference"], entry[key]["vs_onnx"]) > RTOL_FP32:
                    ok = False
        entry["onnxruntime_cuda"] = _onnxruntime_cuda(ort, os.path.join(directory, f"{name}.onnx"), x, reference)
        if entry["onnxruntime_cuda"].get("tf32_off", {}).get("vs_tf_cpu_reference", 0.0) > RTOL_FP32:
            ok = False
        result["models"][name] = entry
    result["passed"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    if not on_gpu:
        print("JAX sees no GPU: nothing was checked on a GPU", file=sys.stderr)
    return 0 if ok else 1


def _onnxruntime_cuda(ort, onnx_path: str, x, reference) -> dict:
    """The ONNX model through keras_bn_ext's worker on CUDA, TF32 off and on."""
    from keras_bn_ext.export.onnx.placement import parse_placement
    from keras_bn_ext.export.onnx.verify import run_onnxruntime

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                           "(the CPU package; carry onnxruntime-gpu to run this part)"}
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    entry = {}
    for tf32 in (False, True):
        outputs, meta = run_onnxruntime(onnx_path, [feed], provider="cuda", session={"tf32": tf32})
        placement = parse_placement(meta["log"])
        entry["tf32_on" if tf32 else "tf32_off"] = {
            "provider": meta["provider"],
            "preload": meta.get("preload"),
            "vs_tf_cpu_reference": _rel(outputs[0][0], reference),
            "placement": placement.to_dict() if placement else None,
        }
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="write models, inputs and the TF CPU reference (needs TensorFlow)")
    p.add_argument("directory")
    c = sub.add_parser("check", help="run them on the GPU through Keras's JAX backend")
    c.add_argument("directory")
    c.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.directory)
        return 0
    return check(args.directory, args.out)


if __name__ == "__main__":
    sys.exit(main())
