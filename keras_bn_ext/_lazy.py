"""PEP 562 lazy attributes for the package's `__init__` files (as tf2onnx does): a name
is imported from its module on first access, so `import keras_bn_ext` and the CLIs'
`--help` import neither Keras nor TensorFlow."""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_attributes(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for `package`, whose `exports` maps a public name to the
    module (absolute name) that defines it."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)  # next access is plain
        return value

    def __dir__():
        return sorted(set(globals_of(package)) | set(exports))

    return __getattr__, __dir__


def globals_of(package: str) -> dict:
    return vars(importlib.import_module(package))
