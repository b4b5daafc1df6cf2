"""Register `keras_bn_ext>BatchNormalization` with Keras without importing Keras.

Keras finds a custom layer of a saved model only if its class was registered before
the load. `import keras_bn_ext` used to register it by importing everything; the
package is lazy now, so registration follows Keras instead: at once when Keras is
already imported, otherwise right after Keras's own import finishes (a one-shot
import hook). Either way `import keras_bn_ext` then `keras.saving.load_model(...)` works.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_LAYER_MODULE = "keras_bn_ext.layers.batch_normalization"
# The quantization-aware training layers (a saved QAT model holds them).
_QAT_MODULES = ("keras_bn_ext.qat.activation", "keras_bn_ext.qat.conv")


def _register() -> None:
    try:
        for module in (_LAYER_MODULE, *_QAT_MODULES):
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - never break the user's `import keras`
        warnings.warn(f"keras_bn_ext could not register its layer with Keras: {exc!r}", stacklevel=2)


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of `keras` so registration runs after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; the real finders locate keras
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_with_keras() -> None:
    """Register the layer now if Keras is imported, else as soon as it is."""
    if "keras" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterKerasImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasImport())
