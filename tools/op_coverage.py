"""Op coverage: one tiny model per Keras activation, `keras.ops` function and stock layer
(Input -> Conv2D -> BatchNormalization -> the op -> Flatten -> Dense), exported to ONNX
(`export.driver.export_verified`: onnxruntime CPU, and LiteRT), each file
verified against the Keras model as every export is. Writes docs/OPS.md: converted (with
its error), wrong (verification failed: the tool exits 1) or refused (with the reason).

    python tools/op_coverage.py                 # the whole sweep -> docs/OPS.md (~15 min, 2 cores)
    python tools/op_coverage.py --quick --out /tmp/OPS.md --json /tmp/ops.json   # CI's subset
    python tools/op_coverage.py --only gelu,erfc --targets onnx
    python tools/op_coverage.py --only AveragePooling2D --update rows.json   # re-run rows of a sweep

The op sees the BN's output (values around N(0, 1)); ops with a restricted domain get it
mapped there first (log of |h| + 0.1, arccos of tanh(h), ...), as a model would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def _catalogue():
    import keras
    from keras import layers, ops

    pos = lambda h: ops.abs(h) + 0.1  # noqa: E731 - (0.1, inf)
    unit = lambda h: ops.tanh(h) * 0.99  # noqa: E731 - (-1, 1)
    cases = {}

    def add(kind, name, fn):
        cases[name] = (kind, fn)

    for name in ("celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid", "hard_silu",
                 "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "log_softmax", "mish", "relu", "relu6", "selu",
                 "sigmoid", "silu", "soft_shrink", "softmax", "softplus", "softsign", "sparse_plus",
                 "sparse_sigmoid", "sparsemax", "squareplus", "tanh", "tanh_shrink", "threshold"):
        # As a model applies one: an Activation layer (some call TensorFlow directly, which
        # a symbolic KerasTensor cannot go through).
        fn = getattr(keras.activations, name)
        if name == "glu":  # Activation("glu") reports the input shape, not the halved one (Keras 3.15)
            add("activation", name, lambda h, fn=fn: fn(h))
        elif name == "threshold":
            add("activation", name, lambda h, fn=fn: layers.Activation(lambda t: fn(t, 0.1, 0.0))(h))
        else:
            add("activation", name, lambda h, fn=fn: layers.Activation(fn)(h))
    add("activation", "gelu(approximate)",
        lambda h: layers.Activation(lambda t: keras.activations.gelu(t, approximate=True))(h))
    add("activation", "celu(alpha=0.5)", lambda h: layers.Activation(lambda t: keras.activations.celu(t, alpha=0.5))(h))

    unary = {
        "abs": ops.abs, "absolute": ops.absolute, "negative": ops.negative, "square": ops.square,
        "sign": ops.sign, "floor": ops.floor, "ceil": ops.ceil, "round": ops.round, "trunc": ops.trunc,
        "exp": ops.exp, "exp2": ops.exp2, "expm1": ops.expm1, "sin": ops.sin, "cos": ops.cos, "tan": ops.tan,
        "sinh": ops.sinh, "cosh": ops.cosh, "tanh": ops.tanh, "arctan": ops.arctan, "arcsinh": ops.arcsinh,
        "erf": ops.erf, "erfc": ops.erfc, "nan_to_num": lambda h: ops.nan_to_num(ops.log(h)),
        "log": lambda h: ops.log(pos(h)), "log2": lambda h: ops.log2(pos(h)), "log10": lambda h: ops.log10(pos(h)),
        "log1p": lambda h: ops.log1p(pos(h)), "sqrt": lambda h: ops.sqrt(pos(h)), "rsqrt": lambda h: ops.rsqrt(pos(h)),
        "reciprocal": lambda h: ops.reciprocal(pos(h)), "arccos": lambda h: ops.arccos(unit(h)),
        "arcsin": lambda h: ops.arcsin(unit(h)), "arctanh": lambda h: ops.arctanh(unit(h)),
        "arccosh": lambda h: ops.arccosh(pos(h) + 1.0), "erfinv": lambda h: ops.erfinv(unit(h)),
        "signbit": lambda h: ops.cast(ops.signbit(h), "float32"), "isnan": lambda h: ops.cast(ops.isnan(h), "float32"),
        "isinf": lambda h: ops.cast(ops.isinf(h), "float32"),
        "isfinite": lambda h: ops.cast(ops.isfinite(h), "float32"),
        "logical_not": lambda h: ops.cast(ops.logical_not(h > 0), "float32"),
        "clip": lambda h: ops.clip(h, -0.5, 0.5), "where(guarded log)": lambda h: ops.where(
            h > 0, ops.log(ops.maximum(h, 0.0)), 0.0),
        "where(guarded sqrt)": lambda h: ops.where(h > 0, ops.sqrt(ops.maximum(h, 0.0)), 0.0),
        "square(relu)": lambda h: ops.square(ops.relu(h)),
    }
    for name, fn in unary.items():
        add("ops (elementwise)", name, fn)

    binary = {
        "add": ops.add, "subtract": ops.subtract, "multiply": ops.multiply, "divide": lambda a, b: ops.divide(a, pos(b)),
        "true_divide": lambda a, b: ops.true_divide(a, pos(b)), "maximum": ops.maximum, "minimum": ops.minimum,
        "power": lambda a, b: ops.power(pos(a), b), "arctan2": ops.arctan2, "hypot": ops.hypot,
        "logaddexp": ops.logaddexp, "logaddexp2": ops.logaddexp2,
        "floor_divide": lambda a, b: ops.floor_divide(a, pos(b)), "mod": lambda a, b: ops.mod(a, pos(b)),
        "greater": lambda a, b: ops.cast(ops.greater(a, b), "float32"),
        "less_equal": lambda a, b: ops.cast(ops.less_equal(a, b), "float32"),
        "equal": lambda a, b: ops.cast(ops.equal(ops.round(a), ops.round(b)), "float32"),
        "logical_and": lambda a, b: ops.cast(ops.logical_and(a > 0, b > 0), "float32"),
        "logical_xor": lambda a, b: ops.cast(ops.logical_xor(a > 0, b > 0), "float32"),
        "squared_difference": lambda a, b: ops.square(ops.subtract(a, b)),
    }
    for name, fn in binary.items():
        add("ops (elementwise)", name, lambda h, fn=fn: fn(h, ops.flip(h, axis=-1)))

    reductions = {
        "sum": ops.sum, "mean": ops.mean, "max": ops.max, "min": ops.min, "prod": lambda h, axis: ops.prod(
            ops.sigmoid(h) + 0.5, axis=axis),
        "std": ops.std, "var": ops.var, "logsumexp": ops.logsumexp, "argmax": lambda h, axis: ops.cast(
            ops.argmax(h, axis=axis), "float32"),
        "argmin": lambda h, axis: ops.cast(ops.argmin(h, axis=axis), "float32"),
        "all": lambda h, axis: ops.cast(ops.all(h > -3, axis=axis), "float32"),
        "any": lambda h, axis: ops.cast(ops.any(h > 1, axis=axis), "float32"),
        "norm": lambda h, axis: ops.norm(h, axis=axis), "cumsum": ops.cumsum,
        "cumprod": lambda h, axis: ops.cumprod(ops.sigmoid(h) + 0.5, axis=axis),
        "median": ops.median, "amax": ops.amax, "count_nonzero": lambda h, axis: ops.cast(
            ops.count_nonzero(ops.relu(h), axis=axis), "float32"),
        "sort": ops.sort, "argsort": lambda h, axis: ops.cast(ops.argsort(h, axis=axis), "float32"),
        "softmax": lambda h, axis: ops.softmax(h, axis=axis), "normalize": lambda h, axis: ops.normalize(h, axis=axis),
        "top_k": lambda h, axis: ops.top_k(h, 2)[0],
        "one_hot(argmax)": lambda h, axis: ops.one_hot(ops.argmax(h, axis=-1), 6),
    }
    for name, fn in reductions.items():
        add("ops (reduction)", f"{name}(axis=-1)", lambda h, fn=fn: fn(h, axis=-1))
    for name in ("sum", "mean", "max", "std", "logsumexp", "cumsum", "cumprod"):
        add("ops (reduction)", f"{name}(axis=1)", lambda h, fn=reductions[name]: fn(h, axis=1))

    stock = {
        "ReLU(max_value=6)": lambda h: layers.ReLU(max_value=6.0)(h), "LeakyReLU": lambda h: layers.LeakyReLU()(h),
        "PReLU": lambda h: layers.PReLU()(h), "ELU": lambda h: layers.ELU()(h), "Softmax": lambda h: layers.Softmax()(h),
        "Dropout": lambda h: layers.Dropout(0.5)(h), "GaussianNoise": lambda h: layers.GaussianNoise(0.1)(h),
        "SpatialDropout2D": lambda h: layers.SpatialDropout2D(0.2)(h),
        "LayerNormalization": lambda h: layers.LayerNormalization()(h),
        "GroupNormalization": lambda h: layers.GroupNormalization(groups=2)(h),
        "UnitNormalization": lambda h: layers.UnitNormalization()(h),
        "RMSNormalization": lambda h: layers.RMSNormalization()(h),
        "Normalization(adapted)": "adapted",
        "Discretization": lambda h: ops.cast(layers.Discretization(bin_boundaries=[-1.0, 0.0, 0.5])(h), "float32"),
        "Rescaling": lambda h: layers.Rescaling(0.5, offset=0.1)(h),
        "MaxPooling2D": lambda h: layers.MaxPooling2D()(h), "AveragePooling2D": lambda h: layers.AveragePooling2D(2)(h),
        "ZeroPadding2D": lambda h: layers.ZeroPadding2D(1)(h), "Cropping2D": lambda h: layers.Cropping2D(1)(h),
        "UpSampling2D(nearest)": lambda h: layers.UpSampling2D()(h),
        "UpSampling2D(bilinear)": lambda h: layers.UpSampling2D(interpolation="bilinear")(h),
        "Resizing(bilinear)": lambda h: layers.Resizing(12, 12)(h),
        "Resizing(nearest)": lambda h: layers.Resizing(12, 12, interpolation="nearest")(h),
        "Resizing(bicubic)": lambda h: layers.Resizing(12, 12, interpolation="bicubic")(h),
        "resize(lanczos3)": lambda h: ops.image.resize(h, (12, 12), interpolation="lanczos3"),
        "resize(antialias)": lambda h: ops.image.resize(h, (4, 4), antialias=True),
        "DepthwiseConv2D": lambda h: layers.DepthwiseConv2D(3, padding="same")(h),
        "SeparableConv2D": lambda h: layers.SeparableConv2D(4, 3, padding="same")(h),
        "Conv2DTranspose": lambda h: layers.Conv2DTranspose(4, 3, strides=2)(h),
        "Permute": lambda h: layers.Permute((3, 1, 2))(h), "Reshape": lambda h: layers.Reshape((-1, 6))(h),
        "RepeatVector": lambda h: layers.RepeatVector(2)(layers.Flatten()(h)),
        "Attention": lambda h: layers.Attention()([layers.Reshape((-1, 6))(h)] * 2),
        "MultiHeadAttention": lambda h: layers.MultiHeadAttention(2, 3)(*[layers.Reshape((-1, 6))(h)] * 2),
        "Add": lambda h: layers.Add()([h, h]), "Multiply": lambda h: layers.Multiply()([h, h]),
        "Concatenate": lambda h: layers.Concatenate()([h, h]), "Average": lambda h: layers.Average()([h, h]),
        "Maximum": lambda h: layers.Maximum()([h, h]),
        "GlobalAveragePooling2D(keepdims)": lambda h: layers.GlobalAveragePooling2D(keepdims=True)(h),
        "Identity": lambda h: layers.Identity()(h), "ActivityRegularization": lambda h: layers.ActivityRegularization()(h),
    }
    for name, fn in stock.items():
        add("layer", name, fn)
    return cases


QUICK = ("gelu", "celu", "erfc", "expm1", "log1p", "erfinv", "signbit", "where(guarded log)", "nan_to_num",
         "argmax(axis=-1)", "one_hot(argmax)(axis=-1)", "cumprod(axis=-1)", "Discretization", "Normalization(adapted)",
         "Resizing(bicubic)", "resize(antialias)", "relu", "softmax")


def _model(name, fn, seed):
    import keras
    import numpy as np
    from keras import layers

    from keras_bn_ext.testing import randomize_batchnorms

    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 3), name="image")
    h = layers.BatchNormalization()(layers.Conv2D(6, 3, padding="same")(x))
    if fn == "adapted":
        norm = layers.Normalization()
        norm.adapt(np.random.default_rng(seed).normal(2.0, 3.0, size=(16, 8, 8, 6)).astype("float32"))
        h = norm(h)
    else:
        h = fn(h)
    h = keras.ops.cast(h, "float32")
    y = layers.Dense(3, name="head")(layers.Flatten()(h) if len(h.shape) > 2 else h)
    model = keras.Model(x, y, name="op_" + "".join(c if c.isalnum() else "_" for c in name))
    randomize_batchnorms(model, seed=seed)
    return model


def _one(target, model, folder):
    from keras_bn_ext.errors import KerasBnExtError

    path = Path(folder) / f"{model.name}.{'onnx' if target == 'onnx' else 'tflite'}"
    try:
        from keras_bn_ext.export.driver import export_verified
        from keras_bn_ext.export.onnx.options import OnnxOptions
        from keras_bn_ext.export.onnx.target import OnnxTarget

        result = export_verified(model, path, target=OnnxTarget(OnnxOptions(provider="cpu")) if target == "onnx"
                                 else target)
        comparison = result.verification.comparison
    except KerasBnExtError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"status": "refused", "code": exc.code, "op": exc.op, "reason": first[:300]}
    except Exception as exc:  # noqa: BLE001 - a converter's own crash is a refusal too, named
        return {"status": "refused", "code": "unexpected", "op": None, "reason": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        for leftover in Path(folder).glob(f"{model.name}*"):
            leftover.unlink()
    status = "converts" if result.passed else "wrong"
    return {"status": status, "max_rel_err": comparison.max_rel_err,
            "nonfinite_mismatches": comparison.nonfinite_mismatches,
            "float64": (result.verification.exact.reference_code if result.verification.exact else None)}


def sweep(names, targets, seed=0, log=print):
    rows = []
    cases = _catalogue()
    with tempfile.TemporaryDirectory(prefix="op_coverage_") as folder:
        for name in names:
            kind, fn = cases[name]
            row = {"name": name, "kind": kind}
            try:
                model = _model(name, fn, seed)
            except Exception as exc:  # noqa: BLE001 - Keras itself cannot build it
                row["build_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                rows.append(row)
                log(f"{name}: Keras cannot build it ({row['build_error']})")
                continue
            for target in targets:
                start = time.perf_counter()
                row[target] = _one(target, model, folder)
                row[target]["seconds"] = round(time.perf_counter() - start, 2)
            log(f"{name}: " + ", ".join(f"{t} {row[t]['status']}" for t in targets))
            rows.append(row)
    return rows


def _cell(r):
    if r is None:
        return "-"
    if r["status"] == "converts":
        return f"converts ({r['max_rel_err']:.1e})"
    if r["status"] == "wrong":
        extra = f", {r['nonfinite_mismatches']} NaN/inf" if r["nonfinite_mismatches"] else ""
        return f"**wrong, exit 1** ({r['max_rel_err']:.1e}{extra})"
    return f"refused: {r['reason'].replace('|', '/')}"


def counts(rows, target):
    out = {"converts": 0, "wrong": 0, "refused": 0}
    for row in rows:
        if target in row:
            out[row[target]["status"]] += 1
    return out


def markdown(rows, targets, *, quick):
    lines = ["# Op coverage", "",
             "Written by `tools/op_coverage.py`" + (" --quick" if quick else "") + ": one model per op, "
             "Input -> Conv2D -> BatchNormalization -> op -> Flatten -> Dense, random weights and BN statistics, "
             "exported with the project's tools and verified against Keras (float32, 1e-5 relative; "
             "the float64 judgement where its twin is valid). *wrong* means the file was written and "
             "the tool exits 1; nothing here exits 0 on a wrong file.", ""]
    for t in targets:
        c = counts(rows, t)
        lines.append(f"- **{t}**: {c['converts']} convert and verify, {c['refused']} refused by name, "
                     f"{c['wrong']} wrong (exit 1), of {sum(c.values())}")
    built = [r for r in rows if "build_error" in r]
    if built:
        lines.append(f"- Keras itself cannot build {len(built)}: " + ", ".join(r["name"] for r in built))
    lines += ["", "| op | kind | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for row in rows:
        if "build_error" in row:
            continue
        lines.append(f"| `{row['name']}` | {row['kind']} | " + " | ".join(_cell(row.get(t)) for t in targets) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} cases (CI)")
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--targets", default="onnx,litert", help="onnx,litert (default both)")
    parser.add_argument("--out", default=str(REPO / "docs" / "OPS.md"), help="the Markdown table")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--update", metavar="ROWS.json",
                        help="rows of an earlier sweep (--json): the cases run now replace theirs, the table "
                             "is written from all of them, and the file is rewritten")
    args = parser.parse_args(argv)
    names = list(_catalogue())
    if args.only:
        names = [n for n in args.only.split(",")]
    elif args.quick:
        names = list(QUICK)
    targets = [t for t in args.targets.split(",") if t]
    rows = sweep(names, targets, log=lambda s: print(s, flush=True))
    if args.update:
        fresh = {row["name"]: row for row in rows}
        earlier = json.loads(Path(args.update).read_text())
        rows = [fresh.pop(row["name"], row) for row in earlier] + list(fresh.values())
        Path(args.update).write_text(json.dumps(rows, indent=1))
    Path(args.out).write_text(markdown(rows, targets, quick=args.quick))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for t in targets:
        print(f"{t}: {counts(rows, t)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
