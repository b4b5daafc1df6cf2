"""Measure quantization-aware training on a trained fixture: float vs post-training
quantization vs the QAT model (untrained, trained) vs its file on the target's runtime.

For each configuration (target, weight bits, per channel or per tensor): the float model
fine-tuned for the same epoch QAT gets (the fairer baseline) and PTQ of both through the
shared INT8 driver with no node kept in float (512 training digits calibrate; ONNX 4-bit
weights MSE-clipped), then `quantize_model` on the same 512 digits, one epoch of `model.fit`
(Adam 1e-4, batch 64) on the 8,000 training digits, and the INT8 file written from the
learned ranges and run on the target's integer kernels. Accuracy on the 2,000 test digits; agreement and SQNR of the file
against the QAT model's own simulation. Prints one Markdown table (the README's).

    python tools/qat_table.py [--fixture dwsep] [--configs onnx:8:pc,onnx:8:pt,onnx:4:pc,onnx:4:pt,litert:8:pc]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]

DEFAULT_CONFIGS = "onnx:8:pc,onnx:8:pt,onnx:4:pc,onnx:4:pt,litert:8:pc,litert:8:pt"
W4_FREEZE = 100  # BN statistics frozen after 100 steps at 4 bits (the README says why)


def _digits():
    import numpy as np

    with np.load(REPO / "tools" / "data" / "mnist-10k.npz") as d:
        return ((d["x_train"][..., None].astype("float32") / 255.0, d["y_train"].astype("int64")),
                (d["x_test"][..., None].astype("float32") / 255.0, d["y_test"].astype("int64")))


def _accuracy(model, x, y) -> float:
    import numpy as np

    return float((np.argmax(model.predict(x, verbose=0, batch_size=500), 1) == y).mean())


def _target(name: str, bits: int, per_channel: bool):
    from keras_bn_ext.export.onnx.options import OnnxInt8Options
    from keras_bn_ext.export.onnx.target import OnnxTarget
    from keras_bn_ext.export.target import get_target

    if name == "onnx":
        return OnnxTarget(int8=OnnxInt8Options(per_channel=per_channel, weight_bits=bits))
    return get_target(name)


def measure(fixture: str, target: str, bits: int, per_channel: bool, work: Path) -> dict:
    import keras

    from keras_bn_ext.export.int8 import Int8Options, export_int8
    from keras_bn_ext.qat import quantize_model

    (x_train, y_train), (x_test, y_test) = _digits()
    path = REPO / "tests" / "fixtures" / "int8" / f"{fixture}.keras"
    model = keras.saving.load_model(path)
    row = {"float": _accuracy(model, x_test, y_test)}
    tag = f"{fixture}.{target}.w{bits}.{'pc' if per_channel else 'pt'}"
    # The fairer baseline: the float model trained the same epoch QAT gets (same optimizer,
    # rate, batch and seed), then quantized after training.
    keras.utils.set_random_seed(0)
    tuned = keras.saving.load_model(path)
    tuned.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    tuned.fit(x_train, y_train, batch_size=64, epochs=1, verbose=0)
    row["tuned"] = _accuracy(tuned, x_test, y_test)
    # PTQ: LiteRT's converter quantizes weights per channel only.
    if target == "onnx" or per_channel:
        for key, source in (("ptq", model), ("tuned_ptq", tuned)):
            # No fallback: every layer quantized, as in the QAT file (the default driver would
            # keep the worst nodes in float until the criteria pass).
            ptq = export_int8(source, work / f"{tag}.{key}", x_train[:512], target=_target(target, bits, per_channel),
                              eval_data=[x_test], labels=y_test, options=Int8Options(fallback_budget=0))
            row[key] = ptq.fidelity.outputs[0].accuracy_quantized
            assert not ptq.kept_in_float, ptq.kept_in_float
    keras.utils.set_random_seed(0)
    qat = quantize_model(model, calibration=x_train[:512], weight_bits=bits, per_channel=per_channel, target=target,
                         bn_freeze_after=W4_FREEZE if bits == 4 else None)
    row["untrained"] = _accuracy(qat, x_test, y_test)
    qat.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    start = time.perf_counter()
    qat.fit(x_train, y_train, batch_size=64, epochs=1, verbose=0)
    row["train_s"] = time.perf_counter() - start
    result = export_int8(qat, work / f"{tag}.qat", None, target=target, eval_data=[x_test], labels=y_test)
    out = result.fidelity.outputs[0]
    row.update(simulated=out.accuracy_float, file=out.accuracy_quantized, agreement=out.top1_agreement,
               sqnr=out.sqnr_db, passed=result.passed)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixture", default="dwsep", help="a trained fixture under tests/fixtures/int8 (default dwsep)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"target:bits:pc|pt, comma-separated (default {DEFAULT_CONFIGS})")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qat_table_") as work:
        for config in args.configs.split(","):
            target, bits, mode = config.split(":")
            row = measure(args.fixture, target, int(bits), mode == "pc", Path(work))
            rows.append((config, row))
            print(f"{config}: {row}", file=sys.stderr, flush=True)
    print(f"| {args.fixture} | target | float | PTQ | float + 1 epoch | its PTQ | QAT untrained | QAT simulated | "
          "QAT file | file vs simulation: agreement, SQNR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config, r in rows:
        target, bits, mode = config.split(":")
        ptq = [f"{r[k]:.4f}" if k in r else "—" for k in ("ptq", "tuned_ptq")]
        print(f"| W{bits}A8 {'per-channel' if mode == 'pc' else 'per-tensor'} | {target} | {r['float']:.4f} | {ptq[0]} | "
              f"{r['tuned']:.4f} | {ptq[1]} | {r['untrained']:.4f} | {r['simulated']:.4f} | {r['file']:.4f} | "
              f"{100 * r['agreement']:.2f}%, {r['sqnr']:.1f} dB{'' if r['passed'] else ' (criteria missed)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
