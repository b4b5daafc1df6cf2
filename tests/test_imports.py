"""The package imports lazily: what each entry point pulls in, checked in fresh processes."""

import json
import os
import re

from keras_bn_ext import BatchNormalization
from tests.helpers import REPO, run_python

HEAVY = ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "jax")


def _loaded_after(code: str) -> set:
    out = run_python(code + f"\nimport json, sys; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    return set(json.loads(out.strip().splitlines()[-1]))


def test_bare_import_loads_neither_keras_nor_tensorflow():
    assert _loaded_after("import keras_bn_ext") == set()


def test_the_layer_imports_keras_but_no_export_stack():
    loaded = _loaded_after("from keras_bn_ext import BatchNormalization")
    assert "keras" in loaded and not loaded & {"tf2onnx", "onnx", "onnxruntime"}


def test_cli_help_imports_nothing_heavy():
    code = (
        "from keras_bn_ext.cli import fold, export_onnx, recalibrate, qat\n"
        "qat.build_parser().format_help()\n"
        "fold.build_parser().format_help(); export_onnx.build_parser().format_help()\n"
        "recalibrate.build_parser().format_help()"
    )
    assert _loaded_after(code) == set()


def test_a_wrong_path_is_refused_before_tensorflow_is_imported(tmp_path):
    # Every CLI error used to take 7-9 s: TensorFlow was imported before the paths were checked.
    model = tmp_path / "m.keras"
    model.write_bytes(b"not a zip")
    np_free = str(tmp_path / "absent.npz")
    code = (
        "import contextlib, io\n"
        "from keras_bn_ext.cli import fold, export_onnx, export_litert, recalibrate\n"
        "codes = []\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        f"    codes.append(export_onnx.main([{str(tmp_path / 'missing.keras')!r}]))\n"
        f"    codes.append(fold.main([{str(model)!r}]))\n"
        f"    codes.append(export_litert.main([{str(model)!r}, '--int8', {np_free!r}]))\n"
        f"    codes.append(recalibrate.main([{str(model)!r}, '--data', {np_free!r}]))\n"
        "assert codes == [2, 2, 2, 2], codes\n"
    )
    assert _loaded_after(code) == set()


def test_import_registers_the_layer_before_or_after_keras(tmp_path):
    import keras

    inputs = keras.Input((3,))
    path = str(tmp_path / "m.keras")
    keras.Model(inputs, BatchNormalization(name="bn")(inputs)).save(path)
    for order in ("import keras_bn_ext, keras", "import keras, keras_bn_ext"):
        out = run_python(f"{order}\nm = keras.saving.load_model({path!r})\nprint(type(m.get_layer('bn')).__module__)")
        assert out.strip().endswith("keras_bn_ext.layers.batch_normalization"), order


def test_no_tool_imports_the_tests():
    for name in os.listdir(os.path.join(REPO, "tools")):
        if name.endswith(".py"):
            text = open(os.path.join(REPO, "tools", name)).read()
            assert not re.search(r"^\s*(from|import) tests\b", text, re.M), name
            assert "sys.path" not in text, name


def test_keras_private_api_stays_in_its_adapter():
    """Every use of Keras's private API is in keras_bn_ext/_keras_internals.py."""
    private = re.compile(r"keras\.src|\._keras_history|\._inbound_nodes|\._run_through_graph|"
                         r"\._flatten_layers|SafeModeScope|\._nodes_by_depth|\._functional\b|_outputs_struct|"
                         r"\bnode\.(operation|is_input|input_tensors|output_tensors)\b|"
                         r"\]\.(operation|input_tensors|output_tensors)\b")
    package = os.path.join(REPO, "keras_bn_ext")
    for root, _, files in os.walk(package):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and name != "_keras_internals.py":
                hits = [line for line in open(path) if private.search(line)]
                assert not hits, (path, hits)


def test_lower_modules_import_nothing_above_them():
    """Layers below the code that uses them: compare, model_io, graph, rebuild, data, stage
    and progress import nothing from folding/, quantization/, recalibration/, export/ or cli/."""
    above = ("keras_bn_ext.folding", "keras_bn_ext.quantization", "keras_bn_ext.recalibration",
             "keras_bn_ext.export", "keras_bn_ext.cli")
    for name in ("compare", "model_io", "graph", "rebuild", "data", "stage", "progress"):
        text = open(os.path.join(REPO, "keras_bn_ext", f"{name}.py")).read()
        imported = re.findall(r"^\s*(?:from|import)\s+(keras_bn_ext[\w.]*)", text, re.M)
        assert not [m for m in imported if m.startswith(above)], (name, imported)


def test_export_functions_take_at_most_eight_parameters():
    """A target's options travel as records (ExportOptions, OnnxOptions, Int8Options), not as
    long keyword lists that each target re-spells."""
    import ast

    too_long = []
    for root, _, files in os.walk(os.path.join(REPO, "keras_bn_ext", "export")):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = node.args
                    params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                    params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
                    if len(params) > 8:
                        too_long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name} ({len(params)})")
    assert not too_long, too_long
