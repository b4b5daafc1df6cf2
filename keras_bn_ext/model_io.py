"""Reading .keras (and legacy .h5) model files with clear, typed errors, and writing
outputs atomically."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import keras

from keras_bn_ext.errors import ModelLoadError
from keras_bn_ext.files import _check_archive, check_model_file, check_output_path  # noqa: F401 (re-exported)

__all__ = [
    "check_model_file",
    "load_model",
    "import_custom_modules",
    "check_output_path",
    "atomic_output",
    "save_model_atomic",
    "loadable_build_configs",
]


def import_custom_modules(modules: Sequence[str]) -> None:
    """Import user modules that register custom layers (a module name or a .py path)."""
    for name in modules:
        try:
            if name.endswith(".py") or os.sep in name:
                spec = importlib.util.spec_from_file_location(Path(name).stem, name)
                if spec is None or spec.loader is None:
                    raise ImportError(f"not a Python file: {name}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except Exception as exc:  # any error in user code is a load error for us
            raise ModelLoadError(
                f"cannot import custom module '{name}': {type(exc).__name__}: {exc}"
            ) from exc


_UNKNOWN_CLASS = re.compile(r"Could not locate class '([^']+)'|Unknown layer: '?([\w.>]+)'?")


def load_model(path: str | os.PathLike, *, safe_mode: bool = True) -> keras.Model:
    """Load a .keras (or legacy Keras .h5/.hdf5) file, turning every way it can fail into
    one ModelLoadError line.

    Args:
        path: The .keras or .h5 file.
        safe_mode: Keras's safe mode: refuse Lambda layers and other code
            stored in the file. Only turn it off for files you trust.
    """
    path = Path(path)
    _check_archive(path)
    try:
        return keras.saving.load_model(path, safe_mode=safe_mode, compile=False)
    except Exception as exc:  # keras raises TypeError/ValueError/KeyError/OSError here
        message = str(exc)
        match = _UNKNOWN_CLASS.search(message)
        if match:
            name = match.group(1) or match.group(2)
            raise ModelLoadError(
                f"{path} uses the custom layer '{name}', which is not registered; pass the "
                "module that defines it with --custom-module MODULE"
            ) from exc
        if "safe_mode" in message:  # Keras's refusal of a Lambda (or other code) in safe mode
            raise ModelLoadError(
                f"{path} holds a Lambda layer (Python code); loading it runs that code. "
                "If you trust the file, pass --unsafe"
            ) from exc
        first = message.strip().splitlines()[0] if message.strip() else ""
        raise ModelLoadError(
            f"cannot load {path}: {type(exc).__name__}: {first[:300]}"
        ) from exc


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); rename it onto `path` only if
    the block succeeds, else remove it. Readers never see a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_model_atomic(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save a model as .keras through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        model.save(tmp)
    return Path(path)


def loadable_build_configs(model: keras.Model, *, leave: keras.Model | None = None) -> list[str]:
    """Keep out of the saved file the build configs that would stop it from loading.

    A .keras file stores each layer's build input shape as JSON, so a loader's
    `build_from_config` gets lists where the layer's own build() saw tuples. Keras's
    layers accept both; some others do not (keras_hub's SpatialPyramidPooling does
    `input_shape[:-1] + (channels,)`). Inside a class's own from_config that never
    runs, but in a plain Functional model (what folding a KerasHub backbone gives)
    it does, and the file cannot be loaded.

    For each layer of `model`'s graph (nested models included) that is not Keras's
    own, a fresh copy (from its config) is built from the JSON form of its build
    config; where that fails and the original tuple form works, the layer's build
    config is dropped: the loader then builds it by calling it on the graph's
    symbolic tensors, as the model was built in the first place. Changes `model`
    (not the layers it shares with `leave`, e.g. the model it was folded from);
    returns one line per layer changed.
    """
    from keras_bn_ext import _keras_internals as internals
    from keras_bn_ext.graph import graph_of, is_rebuildable_model

    changed = []
    shared = {id(layer) for layer in internals.all_sublayers(leave)} if leave is not None else set()

    def builds(layer, build_config) -> bool:
        try:
            fresh = type(layer).from_config(layer.get_config())
            fresh.build_from_config(build_config)
            return True
        except Exception:  # noqa: BLE001 - any failure is what we look for
            return False

    def visit(graph) -> None:
        for layer in graph.layers:
            if is_rebuildable_model(layer):
                visit(graph_of(layer))
                continue
            if type(layer).__module__.split(".")[0] == "keras" or id(layer) in shared:
                continue
            build_config = layer.get_build_config()
            if not build_config:
                continue
            as_stored = json.loads(json.dumps(keras.saving.serialize_keras_object(build_config)))
            if not builds(layer, as_stored) and builds(layer, build_config):
                internals.forget_build_shapes(layer)
                changed.append(f"layer '{layer.name}' ({type(layer).__name__}): its build() fails on "
                               "the JSON form of its input shape; saved without a build config, "
                               "so loading builds it by calling it")

    if is_rebuildable_model(model):
        visit(graph_of(model))
    return changed
