"""Zoo sweep: fold and export models nobody on the team wrote, and record the errors.

Every keras.applications family that contains BatchNormalization (weights=None, the
smallest input it accepts, random BN statistics, the BN closing each residual branch
with a small gamma as in trained networks) and small KerasHub vision backbones
built from their constructors go through what the tools run: `fold_to_file` (fold,
verify, save, reload, verify the file) and `export_onnx` + `verify_onnx` on the
onnxruntime CPU provider, the ONNX outputs compared with the *original* model's.

    python tools/zoo.py                 # the full sweep -> docs/ZOO.md, docs/zoo.json
    python tools/zoo.py --quick --out DIR   # the subset CI runs
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_bn_ext.errors import KerasBnExtError  # noqa: E402
from keras_bn_ext.export.onnx.convert import export_onnx  # noqa: E402
from keras_bn_ext.export.options import ExportOptions  # noqa: E402
from keras_bn_ext.export.target import get_target  # noqa: E402
from keras_bn_ext.export.verify import verify_on_target  # noqa: E402
from keras_bn_ext.export.onnx.options import OnnxOptions  # noqa: E402
from keras_bn_ext.export.onnx.verify import verify_onnx  # noqa: E402
from keras_bn_ext.folding.save import fold_to_file  # noqa: E402
from keras_bn_ext.testing import (  # noqa: E402
    APPLICATIONS,
    RESIDUAL_GAMMA,
    application_model,
    count_batchnorms,
    kerashub_backbones,
    randomize_batchnorms,
    wrapper_models,
)

REPO = Path(__file__).resolve().parent.parent
LIMIT = 1e-5  # max relative error allowed for the fold and for the ONNX export
# --quick: what the other tests do not already fold and export (tests/test_fold_applications.py
# has InceptionV3 and EfficientNetB0): hard-swish and squeeze-excite, BN before conv in dense blocks.
QUICK_APPLICATIONS = ("MobileNetV3Small", "DenseNet121")
# The targets besides ONNX, each a column (the registry's units, converted and verified alike).
OTHER_TARGETS = ("litert", "openvino")
# --quick (CI) converts these to LiteRT and OpenVINO too; the full sweep converts every model.
QUICK_LITERT = ("MobileNetV3Small", "MobileNetBackbone (V3)", "HGNetV2Backbone")
QUICK_KERASHUB = ("ResNetBackbone bottleneck pre-activation", "CSPNetBackbone dark", "MobileNetBackbone (V3)",
                  "HGNetV2Backbone")


class _Skipped(Exception):
    """LiteRT left out of a --quick row."""


def _other_target(row: dict, name: str, model, folded, tmp: Path, *, skip: bool) -> None:
    """As the ONNX column: the reloaded folded model converted by the registered target, verified
    against the original on the target's runtime (batch 2 through the dynamic batch, or the file's fixed batch)."""
    start = time.perf_counter()
    row[f"{name}_passed"] = None
    try:
        if skip:
            raise _Skipped()
        unit = get_target(name)
        path = tmp / f"m{unit.suffix}"
        conversion = unit.convert(folded, path, ExportOptions(fold=False))
        check = verify_on_target(unit, model, path, ExportOptions(samples=1, batch_size=2) if conversion.batch_size
                                 is None else ExportOptions(samples=1), fixed_batch=conversion.batch_size)
        row[f"{name}_batch"] = conversion.batch_size  # None: dynamic; 1 where recurrent layers need it fixed
        row[f"{name}_max_rel_err"] = check.comparison.max_rel_err
        row[f"{name}_float64"] = check.exact.to_dict() if check.exact else None
        row[f"{name}_passed"] = check.passed
    except _Skipped:
        pass
    except (KerasBnExtError, Exception) as exc:  # noqa: BLE001 - recorded in its own column
        row[f"{name}_passed"] = False
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        row[f"{name}_error"] = f"{type(exc).__name__}: {first}"
    row[f"{name}_seconds"] = round(time.perf_counter() - start, 1)


def sweep_one(source: str, name: str, build, *, litert: bool = True) -> dict:
    row = {"source": source, "model": name}
    start = time.perf_counter()
    try:
        model = build()
        randomize_batchnorms(model, residual_gamma=RESIDUAL_GAMMA)
        row["input"] = list(model.inputs[0].shape[1:])
        row["bn_total"] = count_batchnorms(model)
        with tempfile.TemporaryDirectory() as tmp:
            result = fold_to_file(model, Path(tmp) / "folded.keras", samples=1)
            report = result.fold
            row.update(
                bn_counted=report.bn_total,
                bn_folded=report.bn_folded,
                kept=dict(collections.Counter(k.code for k in report.kept)
                          + collections.Counter(k.code for k in report.unused)),
                inlined=len(report.inlined),
                fold_max_rel_err=result.verification.max_rel_err,
                fold_float64=result.exact.to_dict() if result.exact else None,
                reload_error=result.reload_error,
            )
            if result.output is None:
                row["status"] = "not written: " + (result.reload_error or "fold verification failed")
                return row
            folded = keras.saving.load_model(result.output, compile=False)
            export = export_onnx(folded, Path(tmp) / "m.onnx", options=ExportOptions(fold=False))
            verification = verify_onnx(model, Path(tmp) / "m.onnx", options=ExportOptions(samples=1, batch_size=2), onnx=OnnxOptions(provider="cpu"))
            row["onnx_max_rel_err"] = verification.comparison.max_rel_err
            row["onnx_float64"] = verification.exact.to_dict() if verification.exact else None
            row["onnx_unoptimized_max_rel_err"] = (
                verification.unoptimized.max_rel_err if verification.unoptimized else None)
            row["onnx_bn_ops"] = export.op_counts.get("BatchNormalization", 0)
            row["onnx_guards"] = len(export.guards)
            for target in OTHER_TARGETS:
                _other_target(row, target, model, folded, Path(tmp), skip=not litert)
            ok = (result.passed and verification.passed and row["bn_counted"] == row["bn_total"]
                  and all(row[f"{t}_passed"] is not False for t in OTHER_TARGETS))
            row["status"] = "ok" if ok else "ERROR: verification failed or BNs uncounted"
            if verification.unoptimized is not None and verification.unoptimized.passed:
                rule = verification.optimizer_culprit or "graph optimizations"
                row["status"] = (f"onnxruntime's {rule} is wrong here; the graph is exact "
                                 f"({row['onnx_unoptimized_max_rel_err']:.1e} with optimizations off)")
    except (KerasBnExtError, Exception) as exc:  # noqa: BLE001 - a sweep records, it does not stop
        row["status"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        row["seconds"] = round(time.perf_counter() - start, 1)
        keras.backend.clear_session()
    return row


def _err(row: dict, key: str) -> str:
    """The float32 error; where it is above the limit, the float64 judgement beside it."""
    if row.get(key) is None:
        return "–"
    text = f"{row[key]:.1e}"
    exact = row.get(key.replace("max_rel_err", "float64"))
    if exact and not exact.get("reference_valid", True):
        text += f" (float64 not applied: {exact['reference_code']}) FAILED"
    elif exact:
        text += (f" (vs float64: model {exact['original_max_rel_err']:.1e}, this "
                 f"{exact['candidate_max_rel_err']:.1e}{'' if exact['passed'] else ' FAILED'})")
    return text


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Zoo sweep",
        "",
        f"`python tools/zoo.py{' --quick' if result['quick'] else ''}` on {result['date']} "
        f"({result['machine']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "). "
        "Each model: weights=None at the smallest input it accepts, random BN statistics "
        "(gamma in [0.5, 1.5], beta and mean ~ N(0, 0.2), variance in [0.5, 1.5]; the BN that closes "
        "a residual branch gets gamma in [0.05, 0.25], as trained residual networks have it: at "
        "full strength a 150-BN EfficientNetV2 with random weights moves its outputs by 64% for a "
        "1e-6 change of its input, and nothing is verifiable on it — see "
        "`keras_bn_ext.testing.randomize_batchnorms`); "
        "`fold_to_file` (fold, verify, save, reload, verify the file) then `export_onnx` of the "
        "reloaded folded model and `verify_onnx` on onnxruntime's CPU provider against the "
        "**original** model. Errors are max|a−b| / max|reference| on random batches. "
        f"Limit: {LIMIT:g} relative (plus 1e-5 absolute). Where float32 against float32 is above it "
        "(deep models with random BN statistics amplify float32 rounding beyond 1e-5 in the original "
        "itself), the judgement is made against the original run in float64, exact arithmetic for "
        "this purpose: the fold is run in float64 too and passes when it changes the function less "
        "than float32 rounding already does in the original; the ONNX outputs pass when their error "
        "is within 4x the Keras float32 model's own. The brackets give those float64 errors: model = "
        "the float32 original, this = the folded model in float64 / the ONNX outputs. "
        "Custom layers that hold BNs and whose call() traces symbolically are replaced by their "
        "graph (`folding.inline`) and their BNs fold; the others are kept with the reason. Every "
        "ONNX file is guarded against onnxruntime's Pad_Fusion (a zero Pad before a MaxPool). LiteRT: "
        "LiteRT and OpenVINO: the registered target's `convert` of the reloaded folded model, then "
        "`verify_on_target` on ai-edge-litert / OpenVINO's CPU runtime (float32) against the original at batch size 2 (through the dynamic batch; "
        "\"batch 1\": recurrent layers, whose tensor lists the converter lowers only with static shapes, are "
        "converted with the batch fixed to 1 and verified at 1); kept "
        "BNs are counted by their stable code (`folding.analysis.KEPT_CODES`).",
        "",
        "| source | model | input | BN total | folded | kept, by code | fold rel err | ONNX rel err | LiteRT rel err "
        "| LiteRT s | OpenVINO rel err | s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        kept = "; ".join(f"{v}× {k}" for k, v in r.get("kept", {}).items()) or "–"
        if r.get("inlined"):
            kept += f" ({r['inlined']} custom layer{'s' if r['inlined'] != 1 else ''} replaced by their graph)"

        lines.append(
            f"| {r['source']} | {r['model']} | {'×'.join(map(str, r.get('input', [])))} | {r.get('bn_total', '–')} | "
            f"{r.get('bn_folded', '–')} | {kept} | {_err(r, 'fold_max_rel_err')} | {_err(r, 'onnx_max_rel_err')} | "
            f"{r.get('litert_error') or _err(r, 'litert_max_rel_err')}"
            f"{' (batch 1)' if r.get('litert_batch') else ''} | {r.get('litert_seconds', '–')} | "
            f"{r.get('openvino_error') or _err(r, 'openvino_max_rel_err')} | {r['seconds']} | {r['status']} |"
        )
    ok = sum(r["status"] == "ok" for r in result["rows"])
    lines += ["", f"{ok} of {len(result['rows'])} ok; sweep took {result['seconds']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def _candidates() -> list:
    candidates = [("keras.applications", n, lambda n=n: application_model(n)) for n in APPLICATIONS]
    candidates += [("Keras layers", n, b) for n, b in wrapper_models().items()]
    try:
        candidates += [("KerasHub", n, b) for n, b in kerashub_backbones().items()]
    except ImportError:
        print("keras_hub is not installed: KerasHub backbones skipped", file=sys.stderr)
    return candidates


def _in_child(name: str, *, litert: bool = True) -> dict:
    """One model in a process of its own: TensorFlow and tf2onnx keep memory between
    conversions, and the largest models need ~10 GB each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--row", str(out)]
                              + ([] if litert else ["--no-litert"]),
                              capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"source": "?", "model": name, "seconds": 0.0,
                "status": f"error: the child process exited {proc.returncode}: {last[:200]}"}


def _versions() -> dict:
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                "onnxruntime": onnxruntime.__version__}
    try:
        import keras_hub

        versions["keras_hub"] = keras_hub.__version__
    except ImportError:
        pass
    return versions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the subset CI runs")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for ZOO.md and zoo.json (default: docs/)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="only these models; repeatable. Where --out holds a sweep, its other rows are kept")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--no-litert", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true", help="only rewrite ZOO.md from the zoo.json in --out")
    args = parser.parse_args(argv)
    if args.render:
        write_markdown(json.loads((Path(args.out) / "zoo.json").read_text()), Path(args.out) / "ZOO.md")
        return 0
    candidates = _candidates()
    order = [c[1] for c in candidates]  # the sweep's row order, before any filter
    if args.one:
        source, name, build = next(c for c in candidates if c[1] == args.one)
        Path(args.row).write_text(json.dumps(sweep_one(source, name, build, litert=not args.no_litert)))
        return 0
    if args.quick:
        candidates = [c for c in candidates if c[1] in QUICK_APPLICATIONS + QUICK_KERASHUB]
    if args.only:
        candidates = [c for c in candidates if c[1] in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.date.today().isoformat(), "quick": args.quick,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "versions": _versions(),
              "rows": [], "seconds": 0.0}
    previous = out / "zoo.json"
    if args.only and previous.exists():
        # Rerun these rows inside the existing sweep; the others stay as they were.
        earlier = json.loads(previous.read_text())
        result["rows"] = [r for r in earlier["rows"] if r["model"] not in args.only and r["model"] in order]
        result["quick"] = earlier.get("quick", False)
    earlier_seconds = sum(r["seconds"] for r in result["rows"])
    started = time.perf_counter()
    for source, name, _ in candidates:
        row = _in_child(name, litert=not args.quick or name in QUICK_LITERT)
        row["source"] = source
        result["rows"].append(row)
        if args.only:
            result["rows"].sort(key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
        result["seconds"] = earlier_seconds + time.perf_counter() - started
        # Written after every model: a sweep that is stopped keeps what it measured.
        (out / "zoo.json").write_text(json.dumps(result, indent=2))
        write_markdown(result, out / "ZOO.md")
        print(f"{name}: {row['status']} ({row['seconds']} s)", flush=True)
    bad = [r["model"] for r in result["rows"] if r["status"] != "ok"]
    print(f"{len(result['rows']) - len(bad)} of {len(result['rows'])} ok" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
