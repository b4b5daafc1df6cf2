"""The main job: the seed notebook's LeNet-BN experiment on MNIST, then fold, export, verify.

1. Data: full MNIST through keras.datasets.mnist.load_data(); --data PATH.npz for a local
   file in that layout; without either (offline), the 10,000-digit sample shipped in
   tools/data/.
2. Trains the seed's LeNet twice with the seed's settings (RMSprop, batch 64, 5 epochs,
   validation_split 0.2): with keras_bn_ext.BatchNormalization() and with
   keras.layers.BatchNormalization(), same seed.
3. Prints test loss/accuracy of both and the first BN layer's gamma and beta, then
   re-estimates the keras.layers run's lagging moving statistics (Keras's momentum 0.99)
   with recalibrate_batchnorms on 2,000 training digits (what bn-recalibrate does).
4. Saves lenet_bn.keras (custom BN), folds it (lenet_bn.folded.keras), exports and
   verifies lenet_bn.onnx, quantizes it to lenet_bn.int8.onnx (calibrated on 512 training
   digits, accuracy on the test digits), exports lenet_bn.tflite (LiteRT, verified) and
   lenet_bn.int8.tflite (full-integer INT8, accuracy on the test digits), trains one epoch of
   quantization-aware training (lenet_bn.qat.keras, what bn-qat runs) and writes its INT8 file
   from the learned ranges (lenet_bn.qat.int8.onnx; float vs PTQ vs QAT printed side by side),
   all through the library API, and compares latencies.
5. Writes history.png and report.json in --out (default runs/lenet_mnist/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn_ext  # noqa: E402
from keras_bn_ext import (  # noqa: E402
    BatchNormalization,
    compare_models,
    export_onnx,
    verify_onnx,
)
from keras_bn_ext.latency import interleaved_timings, keras_forward  # noqa: E402
from keras_bn_ext.lenet import lenet_bn  # noqa: E402
from keras_bn_ext.folding.save import fold_to_file  # noqa: E402
from keras_bn_ext.model_io import save_model_atomic  # noqa: E402
from keras_bn_ext.recalibration import recalibrate_batchnorms  # noqa: E402
from keras_bn_ext.export.driver import export_verified  # noqa: E402
from keras_bn_ext.export.int8 import export_int8  # noqa: E402
from keras_bn_ext.export.options import ExportOptions  # noqa: E402
from keras_bn_ext.qat.options import QatOptions  # noqa: E402
from keras_bn_ext.qat.train import train_qat_to_file  # noqa: E402
from keras_bn_ext.export.onnx.verify import run_onnxruntime  # noqa: E402

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "data" / "mnist-10k.npz"


def print_int8_lines(result) -> None:
    """Accuracy, agreement, SQNR, size and latency of an INT8 result, from its typed fields."""
    o = result.fidelity.outputs[0]
    print(f"  test accuracy float {o.accuracy_float:.4f} -> INT8 {o.accuracy_quantized:.4f} "
          f"({-o.accuracy_drop_pt:+.2f} pt), top-1 agreement {o.top1_agreement:.4f}, "
          f"SQNR {o.sqnr_db:.1f} dB: {'passed' if result.passed else 'FAILED'}")
    lat = result.latency
    print(f"  size {result.size.float_bytes:,} -> {result.size.int8_bytes:,} bytes ({result.size.ratio:.2f}x); "
          f"{result.runtime} {lat.device} batch {lat.batch}: float {lat.float_ms:.3f} ms, INT8 {lat.int8_ms:.3f} ms"
          + (" (INT8 slower: it does not pay here)" if lat.int8_slower else ""))


def load_mnist(path: str | None, *, download: bool = True):
    """Return ((x_train, y_train), (x_test, y_test)) and a description of the source."""
    if path:
        with np.load(path) as d:
            data = (d["x_train"], d["y_train"]), (d["x_test"], d["y_test"])
        return data, f"local file {path}"
    if download:
        try:
            return keras.datasets.mnist.load_data(), "full MNIST (keras.datasets.mnist)"
        except Exception as exc:  # no network, or a blocked host
            # Keras says "URL fetch failure on URL: None -- [Errno -2] Name or service not known".
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(" -- ")[-1]
            print(f"MNIST could not be downloaded ({reason[:120]}); "
                  f"using the shipped 10,000-digit sample {SHIPPED.relative_to(HERE.parent)}")
    with np.load(SHIPPED) as d:
        data = (d["x_train"], d["y_train"]), (d["x_test"], d["y_test"])
    return data, f"shipped MNIST sample {SHIPPED.name} (10,000 real digits)"


def train(bn_factory, data, *, epochs: int, seed: int, verbose: int):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = lenet_bn(bn_factory)
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=64, epochs=epochs, validation_split=0.2, verbose=verbose)
    seconds = time.perf_counter() - start
    loss, acc = model.evaluate(x_test, y_test, verbose=verbose)
    return model, history.history, {"test_loss": float(loss), "test_accuracy": float(acc), "train_seconds": seconds}


def plot(histories: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, h in histories.items():
        epochs = range(1, len(h["loss"]) + 1)
        axes[0].plot(epochs, h["accuracy"], "-o", label=f"{label} train")
        axes[0].plot(epochs, h["val_accuracy"], "--o", label=f"{label} val")
        axes[1].plot(epochs, h["loss"], "-o", label=f"{label} train")
        axes[1].plot(epochs, h["val_loss"], "--o", label=f"{label} val")
    for ax, title in zip(axes, ("accuracy", "loss")):
        ax.set_title(f"LeNet-BN on MNIST: {title}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(model, folded, onnx_path, x_test, *, repeats: int) -> dict:
    """Median latency (ms) of the original and folded Keras models (interleaved) and of
    onnxruntime on the CPU, at batch 1 and 8."""
    results = {}
    forward = {"keras_original": keras_forward(model), "keras_folded": keras_forward(folded)}
    for bs in (1, 8):
        batch = [x_test[:bs]]
        timings = interleaved_timings({k: (lambda f=f: f(batch)) for k, f in forward.items()}, repeats=repeats)
        _, meta = run_onnxruntime(onnx_path, [{"image": x_test[:bs]}], provider="cpu", repeats=repeats)
        results[str(bs)] = {
            **{k: t.median_ms for k, t in timings.items()},
            "onnxruntime_cpu": meta["latency_ms"][str(bs)],
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="MNIST .npz in Keras's layout (default: download, else the shipped sample)")
    parser.add_argument("--no-download", action="store_true", help="do not try to download MNIST")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (seed: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/lenet_mnist", help="output folder (default: runs/lenet_mnist)")
    parser.add_argument("--repeats", type=int, default=50, help="latency repeats (default: 50)")
    parser.add_argument("--quiet", action="store_true", help="no Keras progress bars")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    verbose = 0 if args.quiet else 1

    data, source = load_mnist(args.data, download=not args.no_download)
    (x_train, y_train), (x_test, y_test) = data
    x_train = (x_train.astype("float32") / 255.0)[..., None]
    x_test = (x_test.astype("float32") / 255.0)[..., None]
    print(f"data: {source}: {len(x_train)} training images (20% held out for validation), "
          f"{len(x_test)} test images")
    data = (x_train, y_train), (x_test, y_test)

    runs = {}
    models = {}
    for label, factory in (
        ("keras_bn_ext", BatchNormalization),
        ("keras.layers", keras.layers.BatchNormalization),
    ):
        print(f"\n== LeNet with {label}.BatchNormalization() ==")
        models[label], history, scores = train(factory, data, epochs=args.epochs, seed=args.seed, verbose=verbose)
        runs[label] = {"history": {k: [float(v) for v in vs] for k, vs in history.items()}, **scores}

    print("\n== The seed's comparison (test set) ==")
    for label, r in runs.items():
        print(f"{label:>13}: test loss {r['test_loss']:.4f}, test accuracy {r['test_accuracy']:.4f} "
              f"({r['train_seconds']:.1f} s training)")
    print("(the notebook, on full MNIST: 0.9511 and 0.9503)")
    first_bn = {}
    for label, model in models.items():
        bn = next(l for l in model.layers if isinstance(l, (BatchNormalization, keras.layers.BatchNormalization)))
        first_bn[label] = {
            "gamma": keras.ops.convert_to_numpy(bn.gamma).tolist(),
            "beta": keras.ops.convert_to_numpy(bn.beta).tolist(),
        }
        print(f"{label} first BN gamma: {np.round(first_bn[label]['gamma'], 4).tolist()}")
        print(f"{label} first BN beta:  {np.round(first_bn[label]['beta'], 4).tolist()}")

    # Keras's momentum 0.99 leaves the built-in layer's moving statistics behind after 5
    # short epochs: what bn-recalibrate repairs (exact mode, 2,000 training digits).
    lagging = models["keras.layers"]
    repaired = keras.models.clone_model(lagging)
    repaired.set_weights(lagging.get_weights())
    recal = recalibrate_batchnorms(repaired, [x_train[:2000]])
    pred = np.concatenate([keras.ops.convert_to_numpy(repaired(x_test[i:i + 500], training=False))
                           for i in range(0, len(x_test), 500)])
    recalibration = {**recal.to_dict(), "test_accuracy": float((pred.argmax(1) == y_test).mean()),
                     "test_accuracy_before": runs["keras.layers"]["test_accuracy"]}
    print("\n== bn-recalibrate (the keras.layers run, momentum 0.99; exact, 2,000 training digits) ==")
    print(f"  test accuracy {recalibration['test_accuracy_before']:.4f} -> {recalibration['test_accuracy']:.4f} "
          f"({len(recal.batchnorms)} BN, {recal.levels} levels, {recal.seconds:.2f} s)")

    model = models["keras_bn_ext"]
    paths = {k: out / f"lenet_bn{k}" for k in (".keras", ".folded.keras", ".onnx", ".int8.onnx", ".tflite",
                                                ".int8.tflite", ".xml", ".int8.xml", ".qat.keras", ".qat.int8.onnx")}
    save_model_atomic(model, paths[".keras"])
    # What bn-fold runs: fold, verify, save, reload, verify the file, rename. The demo then
    # uses the file as a user would, and checks it on real digits.
    fold_result = fold_to_file(model, paths[".folded.keras"])
    if fold_result.output is None:
        raise SystemExit(f"bn-fold failed: {fold_result.reload_error or fold_result.verification.to_dict()}")
    fold_report = fold_result.fold
    folded = keras.saving.load_model(paths[".folded.keras"])
    real = [x_test[:512]]
    fold_check = compare_models(model, folded, inputs=real, atol=1e-5, rtol=1e-5)
    print(f"\n== bn-fold ({paths['.folded.keras']}) ==")
    for f in fold_report.folded:
        print(f"  {f.bn} -> {f.into} ({f.direction})")
    print(f"  {fold_report.bn_folded}/{fold_report.bn_total} BN folded; parameters "
          f"{fold_report.params_before:,} -> {fold_report.params_after:,}; on 512 test digits max abs err "
          f"{fold_check.max_abs_err:.3g}, max rel err {fold_check.max_rel_err:.3g}: "
          f"{'passed' if fold_check.passed else 'FAILED'}")

    export = export_onnx(folded, paths[".onnx"], options=ExportOptions(fold=False))  # folded above; verified vs the original
    onnx_check = verify_onnx(model, paths[".onnx"], options=ExportOptions(inputs=real))
    print(f"\n== bn-export-onnx ({paths['.onnx']}, opset {export.opset}) ==")
    print(f"  ops: {export.op_counts}")
    print(f"  onnxruntime {onnx_check.onnxruntime_version} ran on {onnx_check.provider}"
          + (f" (fell back: {onnx_check.fallback_reason})" if onnx_check.fallback_reason else ""))
    print(f"  on 512 test digits: max abs err {onnx_check.comparison.max_abs_err:.3g}, max rel err "
          f"{onnx_check.comparison.max_rel_err:.3g}: {'passed' if onnx_check.passed else 'FAILED'}")

    # INT8, as bn-export-onnx --int8 does: calibrated on 512 training digits, measured
    # against the float Keras model on every test digit (labels: accuracy).
    int8 = export_int8(model, paths[".int8.onnx"], [x_train[:512]], eval_data=[x_test], labels=y_test)
    print(f"\n== bn-export-onnx --int8 ({paths['.int8.onnx']}) ==")
    print(f"  QDQ u8/s8 per-channel, {int8.calibration.method} calibration on 512 training digits; "
          f"target CPU {int8.detail.target_cpu.name}: reduce_range={int8.detail.reduce_range}")
    print_int8_lines(int8)

    # Quantization-aware training, as bn-qat runs it (one epoch, ranges from 512 training
    # digits), then its INT8 file from the learned ranges (bn-export-onnx QAT.keras --eval),
    # judged against the QAT model's own simulation: float vs PTQ vs QAT side by side.
    qat = train_qat_to_file(model, (x_train, y_train), paths[".qat.keras"], options=QatOptions(epochs=1),
                            eval_data=(x_test, y_test))
    qat_model = keras.saving.load_model(paths[".qat.keras"])
    qat8 = export_int8(qat_model, paths[".qat.int8.onnx"], None, eval_data=[x_test], labels=y_test)
    q = qat8.fidelity.outputs[0]
    print(f"\n== bn-qat ({paths['.qat.keras']}) + bn-export-onnx --eval ({paths['.qat.int8.onnx']}) ==")
    print(f"  one QAT epoch ({qat.training.steps} steps, {qat.training.seconds:.1f} s, {qat.training.loss}); "
          f"the saved file reloaded: {'passed' if qat.passed else 'FAILED'}")
    print(f"  test accuracy: float {int8.fidelity.outputs[0].accuracy_float:.4f}, PTQ INT8 "
          f"{int8.fidelity.outputs[0].accuracy_quantized:.4f}, QAT simulated {q.accuracy_float:.4f}, "
          f"QAT INT8 file {q.accuracy_quantized:.4f}")
    print(f"  the QAT file vs its simulation: top-1 agreement {q.top1_agreement:.4f}, SQNR {q.sqnr_db:.1f} dB: "
          f"{'passed' if qat8.passed else 'FAILED'}")

    # The second target: LiteRT, float32 verified against the Keras model on real digits, and
    # full-integer INT8 judged as the ONNX INT8 file is.
    litert = export_verified(model, paths[".tflite"], target="litert", options=ExportOptions(inputs=real))
    lite8 = export_int8(model, paths[".int8.tflite"], [x_train[:512]], target="litert", eval_data=[x_test],
                        labels=y_test)
    print(f"\n== bn-export-litert ({paths['.tflite']}, {paths['.int8.tflite']}) ==")
    print(f"  float32 on 512 test digits: max rel err {litert.verification.comparison.max_rel_err:.3g}: "
          f"{'passed' if litert.passed else 'FAILED'} (ai-edge-litert {litert.verification.runtime_version})")
    print_int8_lines(lite8)

    # The third target, where the openvino extra is installed (the demo extra brings it).
    import importlib.util

    openvino = openvino8 = None
    if importlib.util.find_spec("openvino") is None:
        print("\n(openvino is not installed: bn-export-openvino skipped; pip install '.[openvino]')")
    else:
        openvino = export_verified(model, paths[".xml"], target="openvino", options=ExportOptions(inputs=real))
        openvino8 = export_int8(model, paths[".int8.xml"], [x_train[:512]], target="openvino", eval_data=[x_test],
                                labels=y_test)
        print(f"\n== bn-export-openvino ({paths['.xml']}, {paths['.int8.xml']}) ==")
        print(f"  float32 on 512 test digits: max rel err {openvino.verification.comparison.max_rel_err:.3g}: "
              f"{'passed' if openvino.passed else 'FAILED'} (OpenVINO {openvino.verification.runtime_version} "
              f"on {openvino.verification.device})")
        print_int8_lines(openvino8)

    print("\n== latency, median ms (Keras tf.function interleaved; onnxruntime CPU) ==")
    lat = latency(model, folded, paths[".onnx"], x_test, repeats=args.repeats)
    print(f"  {'batch':>5} {'original':>10} {'folded':>10} {'onnxruntime':>12} {'orig/folded':>12}")
    for bs, row in lat.items():
        print(f"  {bs:>5} {row['keras_original']:>10.3f} {row['keras_folded']:>10.3f} "
              f"{row['onnxruntime_cpu']:>12.3f} {row['keras_original'] / row['keras_folded']:>11.2f}x")

    plot({k: r["history"] for k, r in runs.items()}, out / "history.png")
    report = {
        "data": {"source": source, "train_images": int(len(x_train)), "test_images": int(len(x_test))},
        "settings": {"epochs": args.epochs, "batch_size": 64, "optimizer": "rmsprop",
                     "validation_split": 0.2, "seed": args.seed},
        "runs": runs,
        "first_bn": first_bn,
        "recalibration": recalibration,
        "fold": {**fold_report.to_dict(), "verification": fold_check.to_dict()},
        "onnx": {**export.to_dict(), "exported_from": str(paths[".folded.keras"]),
                 "verification": onnx_check.to_dict()},
        "int8": int8.to_dict(),
        "qat": {**qat.to_dict(), "int8": qat8.to_dict()},
        "litert": {**litert.to_dict(), "int8": lite8.to_dict()},
        "openvino": {**openvino.to_dict(), "int8": openvino8.to_dict()} if openvino is not None else None,
        "latency_ms": lat,
        "artifacts": {k.lstrip("."): str(v) for k, v in paths.items()} | {"plot": str(out / "history.png")},
        "versions": {"keras": keras.__version__, "keras_bn_ext": keras_bn_ext.__version__,
                     "backend": keras.backend.backend(), "python": platform.python_version()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'history.png'} and {out / 'report.json'}")
    ok = (fold_check.passed and onnx_check.passed and int8.passed and qat.passed and qat8.passed and litert.passed
          and lite8.passed)
    return 0 if ok and (openvino is None or (openvino.passed and openvino8.passed)) else 1


if __name__ == "__main__":
    sys.exit(main())
