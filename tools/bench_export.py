"""Export memory and time (BENCHMARKS.md section 9), side by side with plain tf2onnx.

Every measurement is a fresh process; peak = the largest RSS of that process tree
(`getrusage(RUSAGE_CHILDREN)`, as `/usr/bin/time -f %M` reports it). Models are
keras.applications with weights=None and random BN statistics, and one BN network of
~620 M parameters built here from a seed (wide convolutions and dense layers at 4x4;
never committed: 2.5 GB).

    python tools/bench.py --only-export-memory      # measure and update BENCHMARKS.md
    python tools/bench_export.py --out DIR           # the same, result as JSON in DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# tf2onnx on the unfolded model, as a user calls it; prints its own convert seconds.
PLAIN_TF2ONNX = """
import sys, time, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras, tensorflow as tf, tf2onnx
m = keras.saving.load_model(sys.argv[1], compile=False)
spec = [tf.TensorSpec((None,) + tuple(m.inputs[0].shape[1:]), tf.float32, name="x")]
f = tf.function(lambda x: m(x, training=False), input_signature=spec)
t = time.perf_counter()
tf2onnx.convert.from_function(f, input_signature=spec, opset=17, output_path=sys.argv[2])
print(time.perf_counter() - t)
"""

# One export (structure or frozen conversion) in this process, the peak RSS of each phase
# (this process and its children sampled every 10 ms); tf2onnx's own steps wrapped too.
PROFILE = r"""
import json, os, sys, threading, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0
def children(pid):
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            pass
    return out
peak = {"mib": 0.0}
def sample():
    me = os.getpid()
    while True:
        peak["mib"] = max([peak["mib"], rss(me)] + [rss(c) for c in children(me)])
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
rows, depth = [], [0]
class Reporter:
    def start(self, name):
        depth[0] += 1
    def done(self, name, seconds, ok):
        depth[0] -= 1
        rows.append({"phase": name, "depth": depth[0], "seconds": round(seconds, 2), "peak_mib": round(peak["mib"])})
    def update(self, *args):
        pass
from keras_bn_ext import progress
def wrap(module, attr, label):
    original = getattr(module, attr)
    def wrapped(*a, **k):
        with progress.phase(label):
            return original(*a, **k)
    setattr(module, attr, wrapped)
import tf2onnx.convert, tf2onnx.tf_loader, tf2onnx.optimizer
wrap(tf2onnx.tf_loader, "convert_variables_to_constants_v2", "tf2onnx: freeze variables")
wrap(tf2onnx.tf_loader, "tf_optimize", "tf2onnx: TensorFlow grappler")
wrap(tf2onnx.convert, "process_tf_graph", "tf2onnx: TF ops to ONNX")
wrap(tf2onnx.optimizer, "optimize_graph", "tf2onnx: ONNX optimizers")
import keras
from keras_bn_ext.export.driver import export_verified
from keras_bn_ext.export.onnx.options import OnnxOptions
from keras_bn_ext.export.onnx.target import OnnxTarget
with progress.reporting(Reporter()):
    with progress.phase("load"):
        model = keras.saving.load_model(sys.argv[1], compile=False)
    result = export_verified(model, sys.argv[2], target=OnnxTarget(OnnxOptions(provider="cpu", conversion=sys.argv[3])))
print(json.dumps({"passed": result.passed, "rows": rows}))
"""


def _timed(cmd: list[str], timeout: float | None = None) -> dict:
    """A command in a fresh process: wall seconds, exit status, stdout, and peak RSS (MiB)."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    p = subprocess.run(sys.argv[2:], capture_output=True, text=True, timeout=float(sys.argv[1]) or None)\n"
        "    rc, out, err = p.returncode, p.stdout, p.stderr[-2000:]\n"
        "except subprocess.TimeoutExpired:\n"
        "    rc, out, err = 'timeout', '', ''\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'rc': rc, 'stdout': out, 'stderr': err,"
        " 'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, str(timeout or 0), *cmd], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def _save_application(name: str, path: Path) -> int:
    import keras

    from keras_bn_ext.testing import RESIDUAL_GAMMA, randomize_batchnorms

    model = getattr(keras.applications, name)(weights=None, input_shape=(224, 224, 3), classifier_activation=None)
    randomize_batchnorms(model, residual_gamma=RESIDUAL_GAMMA)
    model.save(path)
    return model.count_params()


def big_bn_network(seed: int = 0):
    """~620 M parameters: wide 3x3 convolutions and dense layers at 4x4, each followed by BN."""
    import keras
    from keras import layers

    from keras_bn_ext.testing import randomize_batchnorms

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 64), name="features")
    x = inputs
    for i, filters in enumerate((2048, 4096, 4096, 4096)):
        x = layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = layers.ReLU()(layers.BatchNormalization(name=f"conv{i}_bn")(x))
    x = layers.GlobalAveragePooling2D()(x)
    for i, units in enumerate((8192, 8192, 8192, 8192)):
        x = layers.Dense(units, name=f"dense{i}")(x)
        x = layers.ReLU()(layers.BatchNormalization(name=f"dense{i}_bn")(x))
    model = keras.Model(inputs, layers.Dense(1000, name="logits")(x), name="big_bn")
    randomize_batchnorms(model)
    return model


def _export(src: Path, out: Path, *extra: str) -> dict:
    run = _timed([str(BIN / "bn-export-onnx"), str(src), "-o", str(out), "--json", "--force", "--provider", "cpu",
                  *extra])
    report = json.loads(run["stdout"]) if run["rc"] == 0 else None
    return {"seconds": run["seconds"], "peak_mib": run["peak_mib"], "rc": run["rc"],
            "timings_s": report["timings_s"] if report else None,
            "max_rel_err": max(o["max_rel_err"] for o in report["outputs"]) if report else None,
            "conversion": report["conversion"] if report else None,
            "external_data_bytes": report["external_data_bytes"] if report else None,
            "op_counts": report["op_counts"] if report else None}


def _plain(src: Path, out: Path, timeout: float | None = None) -> dict:
    run = _timed([sys.executable, "-c", PLAIN_TF2ONNX, str(src), str(out)], timeout=timeout)
    ok = run["rc"] == 0
    last = (run["stderr"].strip().splitlines() or [""])[-1][:300]
    return {"seconds": run["seconds"], "peak_mib": run["peak_mib"], "rc": run["rc"],
            "convert_s": float(run["stdout"].strip().splitlines()[-1]) if ok else None,
            "error": None if ok else (f"killed by signal {-run['rc']}" if isinstance(run["rc"], int) and run["rc"] < 0
                                      else last or str(run["rc"]))}


def measure(*, models=("MobileNetV2", "ResNet50", "ResNet152"), big: bool = True) -> dict:
    result = {"date": datetime.date.today().isoformat(), "models": {}, "profile": {}}
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        tmp = Path(tmp)
        for name in models:
            print(f"9. {name} ...", flush=True)
            src = tmp / f"{name}.keras"
            row = {"params": _save_application(name, src)}
            row["plain_tf2onnx"] = _plain(src, tmp / "plain.onnx")
            row["bn_export_onnx"] = _export(src, tmp / "lean.onnx")
            if name != "ResNet152":  # tf2onnx's frozen route on ResNet152 alone needs ~16 GB
                row["bn_export_onnx_frozen"] = _export(src, tmp / "frozen.onnx", "--conversion", "frozen")
                a, b = row["bn_export_onnx"]["op_counts"], row["bn_export_onnx_frozen"]["op_counts"]
                row["same_op_counts"] = {k: v for k, v in a.items() if k != "Reshape"} == {
                    k: v for k, v in b.items() if k != "Reshape"}
            fold = _timed([str(BIN / "bn-fold"), str(src), "-o", str(tmp / "folded.keras"), "--json", "--force"])
            row["bn_fold"] = {"seconds": fold["seconds"], "peak_mib": fold["peak_mib"], "rc": fold["rc"],
                              "timings_s": json.loads(fold["stdout"])["timings_s"] if fold["rc"] == 0 else None}
            result["models"][name] = row
            if name == "ResNet50":
                for conversion in ("structure", "frozen"):
                    run = _timed([sys.executable, "-c", PROFILE, str(src), str(tmp / f"p.{conversion}.onnx"),
                                  conversion])
                    result["profile"][conversion] = json.loads(run["stdout"].strip().splitlines()[-1])["rows"]
            src.unlink()
        if big:
            print("9. a 620 M-parameter BN network ...", flush=True)
            src = tmp / "big.keras"
            model = big_bn_network()
            row = {"params": model.count_params()}
            model.save(src)
            del model
            row["keras_bytes"] = src.stat().st_size
            row["bn_export_onnx"] = _export(src, tmp / "big.onnx")
            row["onnx_bytes"] = (tmp / "big.onnx").stat().st_size if (tmp / "big.onnx").exists() else None
            for f in tmp.glob("big.onnx*"):
                f.unlink()
            row["plain_tf2onnx"] = _plain(src, tmp / "plain_big.onnx", timeout=1200)
            result["big"] = row
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".", help="folder for export_memory.json")
    parser.add_argument("--no-big", action="store_true", help="leave out the 620 M-parameter network")
    parser.add_argument("--models", nargs="*", default=["MobileNetV2", "ResNet50", "ResNet152"],
                        help="keras.applications models (default: MobileNetV2 ResNet50 ResNet152)")
    args = parser.parse_args(argv)
    result = measure(models=args.models, big=not args.no_big)
    Path(args.out, "export_memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
