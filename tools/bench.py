"""Benchmarks, measured side by side in one run (interleaved, each round in a shuffled
order, warm-up first; medians and min-max reported). Writes BENCHMARKS.md and bench.json.

  python tools/bench.py            # the full run (ResNet50 and MobileNetV2 at 224x224)
  python tools/bench.py --quick    # a reduced set, under 3 minutes
  python tools/bench.py --smoke    # every section once on the smallest inputs (the tests' run, ~60 s)

Sections:
1. Training step time of LeNet-BN (batch 64): keras_bn_ext BN vs keras.layers BN, on
   TensorFlow and (in a child process) on JAX when it is installed.
2. Keras inference latency (tf.function, batch 1 and 8) of the original model, the
   folded model and a no-BN twin (the architecture rebuilt from its config without BN,
   holding the folded weights: the physical limit of folding).
3. onnxruntime CPU latency of the exported folded model vs Keras on the folded model.
4. Wall time and peak memory of bn-fold and bn-export-onnx, and of plain tf2onnx
   (from_function), as separate processes.
5. Start-up of the CLIs. 6. The export's guard against onnxruntime's Pad_Fusion.
7. BN recalibration: both modes on ResNet50 224x224 over 512 real images (MNIST digits
   resized to RGB), beside one compiled and one eager forward pass over the same images;
   and exact vs running on a trained ReLU LeNet whose moving statistics lag.
8. INT8: accuracy of quantization variants on the trained fixtures (tests/fixtures/int8)
   over the 2,000 test digits; size and onnxruntime CPU latency float vs INT8 on
   MobileNetV2 and ResNet50 224 at batch 8, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn_ext  # noqa: E402
from keras_bn_ext import BatchNormalization, ExportOptions, export_onnx, fold_batchnorms, lenet_bn  # noqa: E402
from keras_bn_ext.latency import interleaved_timings, keras_forward  # noqa: E402

from keras_bn_ext.testing import randomize_batchnorms  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGETS = {
    "train_custom_over_builtin": 1.05,
    "qat_over_float": 2.0,
    "folded_over_twin": 1.03,
    "ort_over_keras_folded": 1.0,
    "bn_fold_seconds": 5.0,
    "export_over_tf2onnx": 1.1,
    "help_seconds": 0.5,
}


# -- 1. training step -----------------------------------------------------------------

# --smoke (what the tests run): every section's code once, on the smallest models; its numbers
# mean nothing (the report says so). Set by main().
SMOKE = False


def bench_train(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 64)
    steps = {}
    for label, factory in (("keras_bn_ext", BatchNormalization),
                           ("keras.layers", lambda: keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5))):
        keras.utils.set_random_seed(0)
        model = lenet_bn(factory)
        model.compile(keras.optimizers.RMSprop(), "sparse_categorical_crossentropy")
        steps[label] = (lambda m=model: m.train_on_batch(x, y))
    # The quantization-aware twin of the same LeNet (issue 28: its step <= 2x the float step
    # of this package's BN), 8-bit per-channel, every BN fused, ranges trainable.
    from keras_bn_ext.qat import quantize_model

    keras.utils.set_random_seed(0)
    qat = quantize_model(lenet_bn(BatchNormalization), calibration=x, target_cpu="vnni")
    qat.compile(keras.optimizers.RMSprop(), "sparse_categorical_crossentropy")
    steps["qat"] = lambda: qat.train_on_batch(x, y)
    t = interleaved_timings(steps, repeats=repeats, warmup=5)
    return {
        "backend": keras.backend.backend(),
        "timings": {k: v.to_dict() for k, v in t.items()},
        "ratio": t["keras_bn_ext"].median_ms / t["keras.layers"].median_ms,
        "qat_ratio": t["qat"].median_ms / t["keras_bn_ext"].median_ms,
    }


def bench_train_jax(repeats: int, backend: str = "jax") -> dict | None:
    """The training step under another Keras backend, in a child process."""
    import importlib.util

    if SMOKE or importlib.util.find_spec(backend) is None:
        return None
    env = dict(os.environ, KERAS_BACKEND=backend)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{backend}.json"
        subprocess.run([sys.executable, __file__, "--only-train", str(out), "--repeats", str(repeats)],
                       env=env, check=True, capture_output=True)
        return json.loads(out.read_text())


# -- 2./3. inference ------------------------------------------------------------------

def no_bn_twin(model: keras.Model, folded: keras.Model) -> keras.Model:
    """The same architecture without BN, built from the original config by editing it
    (an independent path from fold_batchnorms' graph rebuild), with folded weights."""
    config = copy.deepcopy(model.get_config())
    bn_names = {l["config"]["name"] for l in config["layers"] if l["class_name"] == "BatchNormalization"}
    if isinstance(model, keras.Sequential):
        config["layers"] = [l for l in config["layers"] if l["config"]["name"] not in bn_names]
        producers = {}
    else:
        producers = {}
        for layer in config["layers"]:
            if layer["config"]["name"] in bn_names:
                arg = layer["inbound_nodes"][0]["args"][0]
                producers[layer["config"]["name"]] = arg["config"]["keras_history"][0]

        def rewire(obj):
            if isinstance(obj, dict):
                history = obj.get("config", {}).get("keras_history") if obj.get("class_name") == "__keras_tensor__" else None
                if history and history[0] in producers:
                    history[0] = producers[history[0]]
                for v in obj.values():
                    rewire(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    rewire(v)

        config["layers"] = [l for l in config["layers"] if l["config"]["name"] not in bn_names]
        rewire(config["layers"])
        outputs = config["output_layers"]
        for out in outputs if isinstance(outputs[0], list) else [outputs]:
            if out[0] in producers:
                out[0] = producers[out[0]]
    for layer in config["layers"]:
        if "use_bias" in layer["config"]:
            layer["config"]["use_bias"] = True
    twin = type(model).from_config(config)
    for layer in twin.layers:
        if layer.weights:
            layer.set_weights(folded.get_layer(layer.name).get_weights())
    return twin


def _models(quick: bool):
    size = 32 if SMOKE else 96 if quick else 224
    apps = [("LeNet-BN", lambda: lenet_bn(BatchNormalization), (28, 28, 1))]
    apps.append(("MobileNetV2", lambda: keras.applications.MobileNetV2(
        weights=None, input_shape=(size, size, 3), classifier_activation=None), (size, size, 3)))
    if not quick:
        apps.append(("ResNet50", lambda: keras.applications.ResNet50(
            weights=None, input_shape=(size, size, 3), classifier_activation=None), (size, size, 3)))
    return apps


def bench_inference(quick: bool, repeats: int, threads: int) -> list[dict]:
    import onnxruntime as ort

    rows = []
    for name, build, shape in _models(quick):
        model = build()
        randomize_batchnorms(model)
        folded, report = fold_batchnorms(model)
        twin = no_bn_twin(model, folded)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "m.onnx"
            export_onnx(folded, onnx_path, options=ExportOptions(fold=False))  # already folded above
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            in_name = session.get_inputs()[0].name
            # "twin_again" is the twin under a second compiled function: the A/A control
            # that shows how far two identical candidates drift apart on this machine.
            fwd = {"original": keras_forward(model), "folded": keras_forward(folded),
                   "twin": keras_forward(twin), "twin_again": keras_forward(twin)}
            for bs in (1, 8):
                x = np.random.default_rng(bs).standard_normal((bs, *shape)).astype("float32")
                err_twin = float(np.max(np.abs(fwd["twin"]([x]) - fwd["folded"]([x]))))
                candidates = {k: (lambda f=f: f([x])) for k, f in fwd.items()}
                candidates["onnxruntime"] = lambda: session.run(None, {in_name: x})
                t = interleaved_timings(candidates, repeats=repeats, warmup=3)
                rows.append({
                    "model": name, "input": list(shape), "batch": bs, "bn_folded": report.bn_folded,
                    "timings": {k: v.to_dict() for k, v in t.items()},
                    "speedup_original_over_folded": t["original"].median_ms / t["folded"].median_ms,
                    "folded_over_twin": t["folded"].median_ms / t["twin"].median_ms,
                    "aa_twin_again_over_twin": t["twin_again"].median_ms / t["twin"].median_ms,
                    "ort_over_keras_folded": t["onnxruntime"].median_ms / t["folded"].median_ms,
                    "twin_max_abs_diff": err_twin,
                })
                print(f"  {name} batch {bs}: " + ", ".join(f"{k} {v.median_ms:.2f} ms" for k, v in t.items()), flush=True)
    return rows


# -- 6. the ONNX Pad guard ----------------------------------------------------------------

def bench_pad_guard(quick: bool, repeats: int, threads: int) -> dict:
    """What the export's guard against onnxruntime's Pad_Fusion costs: ResNet50V2 (a zero
    Pad before its stem MaxPool), folded, as tf2onnx converts it (onnxruntime fuses the
    Pad, wrongly) and as export_onnx writes it (the Pad stays), on a default session."""
    import onnx
    import onnxruntime as ort

    from keras_bn_ext.export.onnx.convert import to_onnx_proto
    from keras_bn_ext.export.onnx.guards import guard_pad_into_maxpool

    size = 32 if SMOKE else 96 if quick else 224
    if SMOKE:  # ResNet50V2's stem alone (zero Pad, conv, BN, zero Pad, MaxPool): the guard's code, not its cost
        layers = keras.layers
        x = inp = keras.Input((size, size, 3))
        x = layers.Conv2D(8, 7, strides=2, name="conv1_conv")(layers.ZeroPadding2D(3)(x))
        x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1)(layers.BatchNormalization()(x)))
        model = keras.Model(inp, layers.Dense(4)(layers.GlobalAveragePooling2D()(x)))
    else:
        model = keras.applications.ResNet50V2(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    randomize_batchnorms(model)
    folded, _ = fold_batchnorms(model)
    unguarded = to_onnx_proto(folded)
    guarded = onnx.ModelProto()
    guarded.CopyFrom(unguarded)
    guards = guard_pad_into_maxpool(guarded)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {name: ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, proto in (("unguarded", unguarded), ("guarded", guarded), ("guarded_again", guarded))}
    in_name = sessions["guarded"].get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype("float32")
    reference = keras.ops.convert_to_numpy(folded(x))
    errors = {name: float(np.max(np.abs(s.run(None, {in_name: x})[0] - reference)) / float(np.max(np.abs(reference))))
              for name, s in sessions.items()}
    t = interleaved_timings({name: (lambda s=s: s.run(None, {in_name: x})) for name, s in sessions.items()},
                            repeats=repeats, warmup=3)
    return {
        "date": datetime.date.today().isoformat(), "batch": 1,
        "model": f"ResNet50V2 {'stem ' if SMOKE else ''}{size}x{size}",
        "guards": len(guards), "timings": {k: v.to_dict() for k, v in t.items()},
        "guarded_over_unguarded": t["guarded"].median_ms / t["unguarded"].median_ms,
        "aa_guarded_again_over_guarded": t["guarded_again"].median_ms / t["guarded"].median_ms,
        "max_rel_err": errors,
    }


# -- 8. INT8 ---------------------------------------------------------------------------

_INTERLEAVE = r"""
import json, sys, time, random, numpy as np, onnxruntime as ort
req = json.loads(sys.argv[1])
opts = ort.SessionOptions(); opts.intra_op_num_threads = req["threads"]
sessions = {k: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for k, p in req["models"].items()}
x = np.load(req["input"])["x"]
name = next(iter(sessions.values())).get_inputs()[0].name
times = {k: [] for k in sessions}
for k, s in sessions.items():
    for _ in range(3): s.run(None, {name: x})
for _ in range(req["repeats"]):
    order = list(sessions); random.shuffle(order)
    for k in order:
        t = time.perf_counter(); sessions[k].run(None, {name: x}); times[k].append((time.perf_counter() - t) * 1e3)
print(json.dumps({k: {"median_ms": float(np.median(v)), "min_ms": float(min(v)), "max_ms": float(max(v))}
                  for k, v in times.items()}))
"""


def bench_int8(quick: bool, repeats: int, threads: int) -> dict:
    """Accuracy of INT8 variants on the trained fixtures (2,000 test digits), and size and
    onnxruntime CPU latency float vs INT8 on MobileNetV2 / ResNet50 (interleaved)."""
    from keras_bn_ext.export import int8 as driver
    from keras_bn_ext.export.onnx.cpu import detect_cpu
    from keras_bn_ext.export.onnx.options import OnnxInt8Options
    from keras_bn_ext.export.onnx.target import OnnxTarget
    from keras_bn_ext.quantization.fidelity import Criteria

    def export_int8(model, path, calibration, *, eval_data, labels=None, per_channel=True, method="Percentile",
                    target_cpu="auto", preprocess=True, **shared):
        target = OnnxTarget(int8=OnnxInt8Options(per_channel=per_channel, method=method, target_cpu=target_cpu,
                                                 preprocess=preprocess))
        return driver.export_int8(model, path, calibration, target=target, eval_data=eval_data, labels=labels,
                                  options=driver.Int8Options(**shared))

    with np.load(REPO / "tools" / "data" / "mnist-10k.npz") as d:
        x_train = d["x_train"][:512, ..., None].astype("float32") / 255.0
        x_test, y_test = d["x_test"][..., None].astype("float32") / 255.0, d["y_test"]
    nets = ("dwsep",) if quick else ("lenet_bn", "relu_lenet", "dwsep", "wide_range")
    if SMOKE:  # 256 test digits, not 2,000
        x_test, y_test = x_test[:256], y_test[:256]
    here = detect_cpu()
    variants = {  # label -> export_int8 arguments
        "onnxruntime's default (per-channel, 8-bit weights)": dict(target_cpu="vnni", method="MinMax"),
        "per-channel MinMax, CPU-aware": dict(method="MinMax"),
        "per-channel Entropy, CPU-aware": dict(method="Entropy"),
        "per-channel Percentile, CPU-aware (default)": dict(),
        "per-tensor, no CLE": dict(per_channel=False, equalize="off"),
        "per-tensor with CLE": dict(per_channel=False, equalize="on"),
    }
    if quick:  # --quick: the default and per-tensor with CLE only; --smoke: the default
        variants = {k: v for k, v in variants.items() if "default)" in k or ("with CLE" in k and not SMOKE)}
    accuracy = {}
    with tempfile.TemporaryDirectory() as tmp:
        for net in nets:
            model = keras.saving.load_model(REPO / "tests" / "fixtures" / "int8" / f"{net}.keras")
            row = {}
            for label, kwargs in variants.items():
                r = export_int8(model, Path(tmp) / f"{net}.onnx", [x_train], eval_data=[x_test], labels=y_test,
                                fallback_budget=0, criteria=Criteria(), **kwargs)
                o = r.fidelity.outputs[0]
                row["float"] = o.accuracy_float
                row[label] = o.accuracy_quantized
            accuracy[net] = row
            print(f"   {net}: {row}", flush=True)
        speed = {}
        sizes = [("dwsep", 28)] if SMOKE else [("MobileNetV2", 32)] if quick else [("MobileNetV2", 224), ("ResNet50", 224)]
        for name, size in sizes:
            out = Path(tmp) / f"{name}.int8.onnx"
            if SMOKE:  # the depthwise fixture's INT8 file from the accuracy run above, timed: the code, not the cost
                images = x_train[:64]
                shutil.copyfile(Path(tmp) / f"{name}.onnx", out)
            else:
                keras.utils.set_random_seed(0)
                model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
                randomize_batchnorms(model, seed=0)
                images, _ = _digits(64, size)
                images = images / 127.5  # in [-1, 1]
                r = export_int8(model, out, [images[:48]], eval_data=[images[48:]], fallback_budget=0,
                                criteria=Criteria(min_top1_agreement=None, max_accuracy_drop=None, min_sqnr_db=None))
            # The same without onnxruntime's pre-quantization step: what it is worth, side by side
            # (--smoke: the same file twice, the comparison is not made).
            out_plain = Path(tmp) / f"{name}.int8.nopre.onnx"
            if SMOKE:
                shutil.copyfile(out, out_plain)
            else:
                export_int8(model, out_plain, [images[:48]], eval_data=[images[48:]], fallback_budget=0,
                            preprocess=False,
                            criteria=Criteria(min_top1_agreement=None, max_accuracy_drop=None, min_sqnr_db=None))
            float_path = Path(tmp) / f"{name}.float.onnx"
            export_onnx(model, float_path)
            np.savez(Path(tmp) / "x.npz", x=images[:8])
            req = {"models": {"float": str(float_path), "int8": str(out), "int8_no_pre": str(out_plain)},
                   "input": str(Path(tmp) / "x.npz"), "threads": threads, "repeats": repeats}
            proc = subprocess.run([sys.executable, "-c", _INTERLEAVE, json.dumps(req)], capture_output=True,
                                  text=True, check=True)
            t = json.loads(proc.stdout.strip().splitlines()[-1])
            speed[f"{name} {size}"] = {
                "float_mb": os.path.getsize(float_path) / 1e6, "int8_mb": os.path.getsize(out) / 1e6,
                "size_ratio": os.path.getsize(out) / os.path.getsize(float_path),
                "float_ms": t["float"], "int8_ms": t["int8"],
                "latency_ratio": t["int8"]["median_ms"] / t["float"]["median_ms"],
                "int8_no_pre_ms": t["int8_no_pre"],
                "latency_ratio_no_pre": t["int8_no_pre"]["median_ms"] / t["float"]["median_ms"],
                "preprocess_removed": r.detail.preprocess.removed if r.detail.preprocess else {},
                "sqnr_db": r.fidelity.outputs[0].sqnr_db,
            }
            print(f"   {name}: {speed[f'{name} {size}']}", flush=True)
    return {"date": datetime.date.today().isoformat(), "cpu": here.to_dict(), "accuracy": accuracy,
            "variants": list(variants), "speed": speed, "batch": 8, "threads": threads}


# -- 7. recalibration ------------------------------------------------------------------

def _digits(n: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(REPO / "tools" / "data" / "mnist-10k.npz") as d:
        x, y = d["x_train"][:n, :, :, None].astype("float32") / 255.0, d["y_train"][:n]
    if size:
        x = np.concatenate([keras.ops.convert_to_numpy(keras.ops.image.resize(x[i:i + 64], (size, size)))
                            for i in range(0, n, 64)])
        x = np.repeat(x, 3, axis=-1) * 255.0 - 127.5  # ResNet-like input range
    return x, y


def _lagging_lenet(epochs: int = 3, samples: int = 8000):
    """The recalibration issue's ReLU LeNet: Keras BN (momentum 0.99), Adam, 3 epochs."""
    layers = keras.layers
    x, y = _digits(samples)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1), name="image")
    h = inputs
    for filters in (16, 32, 32):
        h = layers.MaxPooling2D()(layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(h))))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Dense(64)(layers.Flatten()(h))))
    model = keras.Model(inputs, layers.Dense(10)(h))
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model, x


def bench_recalibration(quick: bool) -> dict:
    from keras_bn_ext.recalibration import recalibrate_batchnorms

    with np.load(REPO / "tools" / "data" / "mnist-10k.npz") as d:
        x_test, y_test = d["x_test"][..., None].astype("float32") / 255.0, d["y_test"]

    def accuracy(model, training=False):
        logits = np.concatenate([keras.ops.convert_to_numpy(model(x_test[i:i + 500], training=training))
                                 for i in range(0, len(x_test), 500)])
        return float((logits.argmax(1) == y_test).mean())

    lenet, x_train = _lagging_lenet(*((1, 500) if SMOKE else (1, 2000) if quick else (3, 8000)))
    start = lenet.get_weights()
    lenet_result = {"training_mode": accuracy(lenet, True), "inference_before": accuracy(lenet)}
    variances = {}
    for mode in ("exact", "running"):
        lenet.set_weights(start)
        report = recalibrate_batchnorms(lenet, {"image": x_train[:2000]}, mode=mode)
        lenet_result[mode] = accuracy(lenet)
        lenet_result[f"{mode}_seconds"] = report.seconds
        variances[mode] = [np.asarray(b.new_variance) for b in report.batchnorms]
    lenet_result["max_rel_variance_diff"] = max(
        float(np.max(np.abs(r - e) / np.maximum(e, 1e-12))) for e, r in zip(variances["exact"], variances["running"]))

    size, n = (32, 32) if quick else (224, 512)
    images, _ = _digits(n, size)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
    randomize_batchnorms(model)
    start = model.get_weights()
    seconds = {}
    t = time.perf_counter()
    model.predict(images[:32], batch_size=32, verbose=0)  # compile once
    t = time.perf_counter()
    model.predict(images, batch_size=32, verbose=0)
    seconds["compiled forward pass (model.predict)"] = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, n, 32):
        model(images[i:i + 32], training=False)
    seconds["eager forward pass"] = time.perf_counter() - t
    reports = {}
    for mode in ("exact", "running"):
        model.set_weights(start)
        t = time.perf_counter()
        reports[mode] = recalibrate_batchnorms(model, images, mode=mode, batch_size=32)
        seconds[f"recalibrate_batchnorms(mode='{mode}')"] = time.perf_counter() - t
    return {
        "date": datetime.date.today().isoformat(), "model": f"ResNet50 {size}x{size}", "images": n, "batch": 32,
        "seconds": seconds, "levels": reports["exact"].levels, "passes": reports["exact"].passes,
        "kept_peak_mb": reports["exact"].kept_peak_mb, "bn": len(reports["exact"].batchnorms),
        "lenet": lenet_result,
    }


# -- 4. tools -------------------------------------------------------------------------

PLAIN_TF2ONNX = """
import sys, time, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras, tensorflow as tf, tf2onnx
m = keras.saving.load_model(sys.argv[1])
spec = [tf.TensorSpec((None,) + tuple(m.inputs[0].shape[1:]), tf.float32, name="x")]
f = tf.function(lambda x: m(x, training=False), input_signature=spec)
tf2onnx.convert.from_function(f, input_signature=spec, opset=17, output_path=sys.argv[2])
"""


def _timed(cmd: list[str]) -> dict:
    """Run a command in a fresh process: wall seconds and peak RSS (MiB) of that child."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'rc': p.returncode, 'stdout': p.stdout,"
        " 'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] not in (0,):
        raise RuntimeError(f"{cmd[:3]} exited {result['rc']}")
    return result


def bench_tools(quick: bool, rounds: int) -> dict:
    """Each tool as a fresh process, `rounds` times interleaved (rotating who goes
    first); the median wall time and the largest peak memory are reported."""
    bin_dir = Path(sys.executable).parent
    name = "MobileNetV2" if quick else "ResNet50"
    size = 32 if SMOKE else 96 if quick else 224
    runs: dict[str, list[dict]] = {"bn_fold": [], "bn_export_onnx": [], "plain_tf2onnx": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.keras"
        app = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None,
                                                **({"alpha": 0.35} if SMOKE else {}))
        randomize_batchnorms(app)
        app.save(src)
        commands = {
            "bn_fold": [str(bin_dir / "bn-fold"), str(src), "--json", "--force"],
            "bn_export_onnx": [str(bin_dir / "bn-export-onnx"), str(src), "--json", "--force", "--provider", "cpu"],
            "plain_tf2onnx": [sys.executable, "-c", PLAIN_TF2ONNX, str(src), str(Path(tmp) / "plain.onnx")],
        }
        if SMOKE:  # two fresh TensorFlow processes on two cores: plain tf2onnx is only the ratio's yardstick
            del commands["plain_tf2onnx"], runs["plain_tf2onnx"]
        order = list(commands)
        if SMOKE:  # the three at once: their times mean nothing here, only that each runs
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(order)) as pool:
                for key, row in zip(order, pool.map(lambda key: _timed(commands[key]), order)):
                    runs[key].append(row)
        for i in range(0 if SMOKE else rounds):
            k = i % len(order)
            for key in order[k:] + order[:k]:
                runs[key].append(_timed(commands[key]))

    def summary(key):
        seconds = sorted(r["seconds"] for r in runs[key])
        out = {"seconds": statistics.median(seconds), "min_s": seconds[0], "max_s": seconds[-1],
               "rounds": len(seconds), "peak_mib": max(r["peak_mib"] for r in runs[key])}
        if key != "plain_tf2onnx":
            phases = [json.loads(r["stdout"])["timings_s"] for r in runs[key]]
            out["timings_s"] = {p: statistics.median(ph[p] for ph in phases) for p in phases[0]}
        return out

    result = {"model": f"{name} {size}x{size}", **{key: summary(key) for key in runs}}
    export, plain = result["bn_export_onnx"], result.get("plain_tf2onnx")
    result["export_without_verify_over_tf2onnx"] = (
        (export["seconds"] - export["timings_s"]["verify"]) / plain["seconds"] if plain else None)
    return result


# -- 5. start-up ----------------------------------------------------------------------

def bench_startup(rounds: int) -> dict:
    """Fresh processes, interleaved: the CLIs' --help (target <= 0.5 s: the package is
    lazy, so they import neither Keras nor TensorFlow) and the two kinds of import."""
    bin_dir = Path(sys.executable).parent
    commands = {
        "bn-fold --help": [str(bin_dir / "bn-fold"), "--help"],
        "bn-export-onnx --help": [str(bin_dir / "bn-export-onnx"), "--help"],
        "import keras_bn_ext": [sys.executable, "-c", "import keras_bn_ext"],
        "from keras_bn_ext import BatchNormalization": [
            sys.executable, "-c", "from keras_bn_ext import BatchNormalization"],
    }
    runs: dict[str, list[float]] = {key: [] for key in commands}
    order = list(commands)
    for i in range(rounds):
        k = i % len(order)
        for key in order[k:] + order[:k]:
            runs[key].append(_timed(commands[key])["seconds"])
    return {
        "date": datetime.date.today().isoformat(),
        "rounds": rounds,
        "seconds": {key: {"median": statistics.median(v), "min": min(v), "max": max(v)} for key, v in runs.items()},
    }


# -- report ---------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {result['date']} by `python tools/bench.py{' --quick' if result['quick'] else ''}` on "
        f"{m['cpu']} ({m['cores']} cores), {m['threads_note']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ". "
        "Candidates run interleaved (every round in a new shuffled order) after a warm-up; "
        "medians with min–max in ms. These machines are shared and noisy: read ratios, not "
        "absolute numbers. The A/A column times the twin twice: where folded/twin is within its "
        "distance from 1, the two are equal within what this machine can resolve.",
        "",
        "## 1. Training step, LeNet-BN, batch 64"
        + (f" (measured {result['train_date']})" if result.get("train_date") else ""),
        "",
        "| backend | keras_bn_ext BN | keras.layers BN | ratio (target ≤ 1.05) | QAT twin (8-bit) | "
        "QAT / keras_bn_ext (target ≤ 2) |",
        "|---|---|---|---|---|---|",
    ]
    others = [result.get("train_jax"), result.get("train_torch")]
    for t in [result["train"]] + [t for t in others if t]:
        a, b = t["timings"]["keras_bn_ext"], t["timings"]["keras.layers"]
        q = t["timings"].get("qat")  # (bench.json files from before the QAT column have none)
        qat = (f"{q['median_ms']:.2f} ({q['min_ms']:.2f}–{q['max_ms']:.2f}) | {t['qat_ratio']:.2f} "
               f"({_mark(t['qat_ratio'] <= TARGETS['qat_over_float'])})") if q else "– | –"
        lines.append(f"| {t['backend']} | {a['median_ms']:.2f} ({a['min_ms']:.2f}–{a['max_ms']:.2f}) | "
                     f"{b['median_ms']:.2f} ({b['min_ms']:.2f}–{b['max_ms']:.2f}) | {t['ratio']:.3f} "
                     f"({_mark(t['ratio'] <= TARGETS['train_custom_over_builtin'])}) | {qat} |")
    lines += [
        "",
        "## 2–3. Inference latency (Keras `tf.function`; onnxruntime CPU on the folded export)",
        "",
        "| model | batch | original | folded | no-BN twin | onnxruntime | original/folded | folded/twin (≤ 1.03) | A/A twin/twin | ORT/Keras folded (≤ 1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["inference"]:
        t = r["timings"]

        def cell(k, t=t):
            return f"{t[k]['median_ms']:.2f} ({t[k]['min_ms']:.2f}–{t[k]['max_ms']:.2f})"

        lines.append(
            f"| {r['model']} {'×'.join(map(str, r['input']))} | {r['batch']} | {cell('original')} | {cell('folded')} | "
            f"{cell('twin')} | {cell('onnxruntime')} | {r['speedup_original_over_folded']:.2f}× | "
            f"{r['folded_over_twin']:.3f} ({_mark(r['folded_over_twin'] <= TARGETS['folded_over_twin'])}) | "
            f"{r['aa_twin_again_over_twin']:.3f} | "
            f"{r['ort_over_keras_folded']:.2f} ({_mark(r['ort_over_keras_folded'] <= TARGETS['ort_over_keras_folded'])}) |"
        )
    tools = result["tools"]
    f, e, p = tools["bn_fold"], tools["bn_export_onnx"], tools.get("plain_tf2onnx")
    lines += [
        "",
        f"## 4. Tools on {tools['model']} (fresh processes, {tools['bn_fold']['rounds']} interleaved rounds; "
        "median wall time with min–max, incl. Python and TensorFlow start; peak = largest RSS)",
        "",
        "| command | wall s | peak MiB | phases (s) |",
        "|---|---|---|---|",
        f"| `bn-fold` (target ≤ 5 s: {_mark(f['seconds'] <= TARGETS['bn_fold_seconds'])}) | "
        f"{f['seconds']:.1f} ({f['min_s']:.1f}–{f['max_s']:.1f}) | "
        f"{f['peak_mib']:.0f} | " + ", ".join(f"{k} {v:.2f}" for k, v in f["timings_s"].items()) + " |",
        f"| `bn-export-onnx --provider cpu` | {e['seconds']:.1f} ({e['min_s']:.1f}–{e['max_s']:.1f}) | "
        f"{e['peak_mib']:.0f} | "
        + ", ".join(f"{k} {v:.2f}" for k, v in e["timings_s"].items()) + " |",
    ]
    if p:  # (--smoke does not run it)
        lines += [
            f"| plain tf2onnx `from_function` | {p['seconds']:.1f} ({p['min_s']:.1f}–{p['max_s']:.1f}) | "
            f"{p['peak_mib']:.0f} | |",
            "",
            f"bn-export-onnx without its verification / plain tf2onnx: "
            f"{tools['export_without_verify_over_tf2onnx']:.2f} (target ≤ 1.1: "
            f"{_mark(tools['export_without_verify_over_tf2onnx'] <= TARGETS['export_over_tf2onnx'])}); "
            f"verification took {e['timings_s']['verify']:.1f} s on its own.",
        ]
    lines.append("")
    startup = result.get("startup")
    if startup:
        lines += [
            f"## 5. Start-up (fresh processes, {startup['rounds']} interleaved rounds, measured "
            f"{startup['date']}; median with min–max)",
            "",
            "| command | wall s | target |",
            "|---|---|---|",
        ]
        for key, t in startup["seconds"].items():
            target = f"≤ 0.5 s: {_mark(t['median'] <= TARGETS['help_seconds'])}" if "--help" in key else ""
            lines.append(f"| `{key}` | {t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f}) | {target} |")
        lines.append("")
    guard = result.get("pad_guard")
    if guard:
        t, err = guard["timings"], guard["max_rel_err"]
        lines += [
            f"## 6. The export's guard against onnxruntime's Pad_Fusion ({guard['model']}, batch 1, folded; "
            f"onnxruntime CPU, default session; measured {guard['date']})",
            "",
            "| graph | median ms (min–max) | max rel err vs Keras |",
            "|---|---|---|",
        ]
        for key, label in (("unguarded", "as tf2onnx writes it (onnxruntime fuses the zero Pad into the MaxPool)"),
                           ("guarded", f"as export_onnx writes it ({guard['guards']} Pad guarded)"),
                           ("guarded_again", "the same, second session (A/A)")):
            lines.append(f"| {label} | {t[key]['median_ms']:.2f} ({t[key]['min_ms']:.2f}–{t[key]['max_ms']:.2f}) "
                         f"| {err[key]:.1e} |")
        lines += ["", f"guarded/unguarded {guard['guarded_over_unguarded']:.3f}; A/A "
                      f"{guard['aa_guarded_again_over_guarded']:.3f}.", ""]
    recal = result.get("recalibration")
    if recal:
        sec = recal["seconds"]
        eager = sec["eager forward pass"]
        lines += [
            f"## 7. BN recalibration ({recal['model']}, {recal['images']} real images (MNIST digits resized to "
            f"RGB), batches of {recal['batch']}, {recal['bn']} BN; measured {recal['date']})",
            "",
            "| what | seconds | / eager forward pass |",
            "|---|---|---|",
        ]
        for key, value in sec.items():
            lines.append(f"| {key} | {value:.1f} | {value / eager:.2f} |")
        le = recal["lenet"]
        lines += [
            "",
            f"Exact mode: {recal['levels']} levels, {recal['passes']} passes (discovery and level propagation "
            f"included), at most {recal['kept_peak_mb']:.0f} MiB of activations kept between passes.",
            "",
            "Exact vs running on a trained ReLU LeNet (Keras BN, momentum 0.99, Adam, 3 epochs on the 8,000 "
            "training digits; recalibrated on 2,000 of them; accuracy on the 2,000 test digits):",
            "",
            "| training mode | inference before | after exact | after running | max rel variance exact vs running |",
            "|---|---|---|---|---|",
            f"| {le['training_mode']:.4f} | {le['inference_before']:.4f} | {le['exact']:.4f} "
            f"({le['exact_seconds']:.1f} s) | {le['running']:.4f} ({le['running_seconds']:.1f} s) | "
            f"{le['max_rel_variance_diff']:.2g} |",
            "",
        ]
    q = result.get("int8")
    if q:
        lines += [
            f"## 8. INT8 (onnxruntime QDQ u8/s8; this CPU: {q['cpu']['name']}, reduce_range "
            f"{q['cpu']['reduce_range']}; measured {q['date']})",
            "",
            "Test accuracy on the 2,000 test digits, calibrated on 512 training digits (trained fixtures of "
            "`tools/make_int8_fixtures.py`; no fallback, so each column is the method itself):",
            "",
            "| net | float | " + " | ".join(q["variants"]) + " |",
            "|---|---|" + "---|" * len(q["variants"]),
        ]
        for net, row in q["accuracy"].items():
            lines.append(f"| {net} | {row['float']:.4f} | "
                         + " | ".join(f"{row[v]:.4f} ({100 * (row[v] - row['float']):+.2f})" for v in q["variants"])
                         + " |")
        lines += [
            "",
            f"Size and onnxruntime CPU latency at batch {q['batch']}, {q['threads']} threads, float and INT8 "
            "interleaved in one process (random weights: latency and size only, no accuracy claimed):",
            "",
            "INT8 is the default (onnxruntime's pre-quantization step first); the last columns are the same "
            "quantization of the export as it is (`--no-preprocess`), in the same interleaved run.",
            "",
            "| model | float MB | INT8 MB | INT8/float size | float ms | INT8 ms | INT8/float latency "
            "| pre-step removed | INT8 without pre-step ms | its INT8/float latency |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, sp in q["speed"].items():
            removed = ", ".join(f"{k} {n}" for k, n in sp.get("preprocess_removed", {}).items()) or "–"
            no_pre = (f"{sp['int8_no_pre_ms']['median_ms']:.1f} | {sp['latency_ratio_no_pre']:.2f}"
                      if "int8_no_pre_ms" in sp else "– | –")
            lines.append(f"| {name} | {sp['float_mb']:.1f} | {sp['int8_mb']:.1f} | {sp['size_ratio']:.2f} | "
                         f"{sp['float_ms']['median_ms']:.1f} | {sp['int8_ms']['median_ms']:.1f} | "
                         f"{sp['latency_ratio']:.2f} | {removed} | {no_pre} |")
        lines.append("")
    lines += _export_memory_lines(result.get("export_memory"))
    path.write_text("\n".join(lines))


def bench_export_memory() -> dict:
    """Section 9: tools/bench_export.py (beside this script) in this process."""
    import bench_export

    return bench_export.measure()


def _export_memory_lines(e: dict | None) -> list[str]:
    """Section 9, from `tools/bench_export.py`'s measurement."""
    if not e:
        return []
    gib = lambda mib: f"{mib / 1024:.2f}"  # noqa: E731
    lines = [
        f"## 9. Export memory and time (fresh processes, peak RSS in GiB; measured {e['date']}; "
        "`python tools/bench.py --only-export-memory`)",
        "",
        "keras.applications at 224x224, weights=None with random BN statistics. Plain tf2onnx = "
        "`tf2onnx.convert.from_function` on the loaded model (its convert seconds); bn-export-onnx = the whole tool "
        "(load, fold, convert, write, verify on onnxruntime CPU) with its export phase and verification apart; "
        "*frozen* = the same tool on tf2onnx's own route (`--conversion frozen`, what it did before).",
        "",
        "| model | params | plain tf2onnx convert s | plain peak | bn-export-onnx export s (ratio) | verify s | "
        "peak (ratio) | frozen export s | frozen peak | same ops | bn-fold s | bn-fold peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in e["models"].items():
        p, b, f = r["plain_tf2onnx"], r["bn_export_onnx"], r.get("bn_export_onnx_frozen")
        export_s = b["timings_s"]["export"]
        ratio_s = f" ({export_s / p['convert_s']:.2f})" if p.get("convert_s") else ""
        ratio_m = f" ({b['peak_mib'] / p['peak_mib']:.2f})" if p["rc"] == 0 else ""
        lines.append(
            f"| {name} | {r['params'] / 1e6:.1f} M | {p['convert_s']:.1f} | {gib(p['peak_mib'])} | "
            f"{export_s:.1f}{ratio_s} | {b['timings_s']['verify']:.1f} | {gib(b['peak_mib'])}{ratio_m} | "
            + (f"{f['timings_s']['export']:.1f} | {gib(f['peak_mib'])} | {'yes' if r['same_op_counts'] else 'NO'} | "
               if f else "– | – | – | ")
            + f"{r['bn_fold']['seconds']:.1f} | {gib(r['bn_fold']['peak_mib'])} |")
    for conversion, rows in e.get("profile", {}).items():
        lines += ["", f"ResNet50, phase by phase ({conversion} conversion; peak of the process and its onnxruntime "
                      "child during the phase, GiB):", "", "| phase | s | peak |", "|---|---|---|"]
        for row in rows:
            lines.append(f"| {'&nbsp;' * 4 * row['depth']}{row['phase']} | {row['seconds']:.1f} | "
                         f"{gib(row['peak_mib'])} |")
    big = e.get("big")
    if big:
        b, p = big["bn_export_onnx"], big["plain_tf2onnx"]
        lines += [
            "",
            f"A BN network of {big['params'] / 1e6:.0f} M parameters (`tools/bench_export.big_bn_network`, seed 0; "
            f".keras {big['keras_bytes'] / 2**30:.2f} GiB): bn-export-onnx "
            + (f"exported it with external data ({b['external_data_bytes'] / 2**30:.2f} GiB beside a "
               f"{(big['onnx_bytes'] or 0) / 1024:.0f} KiB model) and verified it (max rel err "
               f"{b['max_rel_err']:.1e}) in {b['seconds']:.0f} s at {gib(b['peak_mib'])} GiB peak"
               if b["rc"] == 0 else f"failed (exit {b['rc']})")
            + "; plain tf2onnx "
            + (f"converted it in {p['convert_s']:.0f} s at {gib(p['peak_mib'])} GiB" if p["rc"] == 0
               else f"did not: {p['error']} after {p['seconds']:.0f} s, at {gib(p['peak_mib'])} GiB peak"),
            "",
        ]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced set (LeNet, MobileNetV2 96x96), < 3 min")
    parser.add_argument("--smoke", action="store_true",
                        help="--quick on the smallest inputs (32x32, no JAX/PyTorch training children): every "
                             "section's code runs once; the numbers mean nothing (what the tests run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per candidate (default 50, quick 10)")
    parser.add_argument("--out", default=str(REPO), help="folder for BENCHMARKS.md and bench.json (default: repo root)")
    parser.add_argument("--only-train", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--only-startup", action="store_true",
                        help="measure section 5 only and update it in the existing bench.json/BENCHMARKS.md")
    parser.add_argument("--only-pad-guard", action="store_true",
                        help="measure section 6 only and update it in bench.json/BENCHMARKS.md")
    parser.add_argument("--only-training", action="store_true",
                        help="measure section 1 (every backend) only and update it in bench.json/BENCHMARKS.md")
    parser.add_argument("--only-recalibration", action="store_true",
                        help="measure section 7 only and update it in bench.json/BENCHMARKS.md")
    parser.add_argument("--only-int8", action="store_true",
                        help="measure section 8 only and update it in bench.json/BENCHMARKS.md")
    parser.add_argument("--only-export-memory", action="store_true",
                        help="measure section 9 (export memory and time, tools/bench_export.py; ~25 min, needs "
                             "~16 GB for plain tf2onnx on ResNet152) and update it in bench.json/BENCHMARKS.md")
    args = parser.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    args.quick = args.quick or args.smoke
    repeats = args.repeats or (10 if args.quick else 50)
    if args.only_train:
        Path(args.only_train).write_text(json.dumps(bench_train(repeats)))
        return 0
    out = Path(args.out)
    threads = os.cpu_count() or 1
    sections = {  # --only-X: measure one section and update it in bench.json / BENCHMARKS.md
        "only_training": lambda r: r.update(train=bench_train(repeats), train_jax=bench_train_jax(repeats),
                                            train_torch=bench_train_jax(repeats, "torch"),
                                            train_date=datetime.date.today().isoformat()),
        "only_recalibration": lambda r: r.update(recalibration=bench_recalibration(args.quick)),
        "only_int8": lambda r: r.update(int8=bench_int8(args.quick, repeats, threads)),
        "only_pad_guard": lambda r: r.update(pad_guard=bench_pad_guard(args.quick, repeats, threads)),
        "only_export_memory": lambda r: r.update(export_memory=bench_export_memory()),
        "only_startup": lambda r: (r.setdefault("targets", {}).update(TARGETS),
                                   r.update(startup=bench_startup(rounds=args.repeats or 10))),
    }
    for flag, measure in sections.items():
        if getattr(args, flag):
            result = json.loads((out / "bench.json").read_text())
            measure(result)
            (out / "bench.json").write_text(json.dumps(result, indent=2))
            write_markdown(result, out / "BENCHMARKS.md")
            print((out / "BENCHMARKS.md").read_text())
            return 0
    started = time.perf_counter()
    print(f"1. training step ... ({time.perf_counter() - started:.0f} s)", flush=True)
    train = bench_train(repeats)
    train_jax = bench_train_jax(repeats)
    train_torch = bench_train_jax(repeats, "torch")
    print(f"2-3. inference ... ({time.perf_counter() - started:.0f} s)", flush=True)
    inference = bench_inference(args.quick, repeats, threads)
    print(f"4. tools ... ({time.perf_counter() - started:.0f} s)", flush=True)
    tools = bench_tools(args.quick, rounds=1 if args.quick else 3)
    print(f"5. start-up ... ({time.perf_counter() - started:.0f} s)", flush=True)
    startup = bench_startup(rounds=1 if args.quick else 10)  # quick: CI's smoke run
    print(f"6. ONNX Pad guard ... ({time.perf_counter() - started:.0f} s)", flush=True)
    pad_guard = bench_pad_guard(args.quick, repeats, threads)
    print(f"7. recalibration ... ({time.perf_counter() - started:.0f} s)", flush=True)
    recalibration = bench_recalibration(args.quick)
    print(f"8. INT8 ... ({time.perf_counter() - started:.0f} s)", flush=True)
    int8 = bench_int8(args.quick, repeats, threads)
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    result = {
        "date": datetime.date.today().isoformat(),
        "quick": args.quick,
        "smoke": args.smoke,
        "machine": {"cpu": _cpu_name(), "cores": threads,
                    "threads_note": f"TensorFlow default threads, onnxruntime intra_op_num_threads={threads}"},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "keras_bn_ext": keras_bn_ext.__version__},
        "targets": TARGETS,
        "train": train,
        "train_jax": train_jax,
        "train_torch": train_torch,
        "inference": inference,
        "tools": tools,
        "startup": startup,
        "pad_guard": pad_guard,
        "recalibration": recalibration,
        "int8": int8,
        "seconds": time.perf_counter() - started,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "BENCHMARKS.md")
    print((out / "BENCHMARKS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
