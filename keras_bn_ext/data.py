"""Data for a model's inputs: arrays keyed by input name (an .npz file, a dict, a list or
one array), checked against the model before any work, and cut into batches.

Random inputs are for checking that two computations agree; what statistics (and
later calibration) are estimated on must be real data, given through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import keras
import numpy as np

from keras_bn_ext.compare import input_specs, shape_fits
from keras_bn_ext.errors import InputDataError
from keras_bn_ext.files import load_npz

__all__ = ["NpzData", "load_npz", "npz_data", "model_arrays", "array_batches", "dataset_batches", "is_array_data"]


# Keras's mnist.npz layout (and keras.datasets' others): inputs and labels per split.
SPLIT_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
LABELS_KEY = "labels"


@dataclass
class NpzData:
    """The arrays of an .npz file for a model's inputs (`model.inputs` order), the labels
    beside them (None: the file has none) and which arrays they were (`keys`)."""

    arrays: list[np.ndarray]
    labels: np.ndarray | None
    keys: list[str]


def npz_data(model: keras.Model, path: str | os.PathLike, *, key: str | None = None, split: str = "train",
             flag: str = "the data file") -> NpzData:
    """The one data-file convention of every tool (`--inputs`, `--int8`, `--eval`, `--data`).

    The arrays are the ones named after the model's InputLayers (in the order of
    `model.inputs`); with `key`, the array of that name (one-input models). A one-input model also
    takes a file with a single array besides its labels, or Keras's `mnist.npz` layout
    (`x_train`/`y_train` for `split="train"`, `x_test`/`y_test` for `"test"`). Labels: the
    array `labels`, or the split's `y_*`. Raises InputDataError naming what the file holds
    and what to pass.
    """
    data = load_npz(path)
    names = [name for name, _, _ in _specs(model, data)]
    x_key, y_key = SPLIT_KEYS[split]
    labels_key = LABELS_KEY if LABELS_KEY in data else None
    if key is not None:
        if len(names) != 1:
            raise InputDataError(f"--data-key is for one-input models; this one has {len(names)} inputs "
                                 f"({', '.join(names)}): key {path} by input name. Received: data_key={key!r}")
        if key not in data:
            raise InputDataError(f"{flag} {path} has no array '{key}' (has: {_listing(data)}). "
                                 f"Received: data_key={key!r}")
        keys = [key]
        paired = {x: y for x, y in SPLIT_KEYS.values()}.get(key)  # --data-key x_test takes y_test beside it
        if labels_key is None and paired in data:
            labels_key = paired
    elif all(name in data for name in names):
        keys = names
    elif len(names) == 1 and x_key in data:
        keys, labels_key = [x_key], labels_key or (y_key if y_key in data else None)
    elif len(names) == 1 and len([k for k in data if k != LABELS_KEY]) == 1:
        keys = [k for k in data if k != LABELS_KEY]
    else:
        missing = [n for n in names if n not in data]
        example = ", ".join(f"{n}=..." for n in names)
        raise InputDataError(
            f"{flag} {path} has no array '{missing[0]}' for the model input of that name (has: {_listing(data)}). "
            f"Save it keyed by input name: numpy.savez('{os.path.basename(path)}', {example})"
            + (", or pass --data-key NAME to pick one of its arrays" if len(names) == 1 else ""))
    arrays = model_arrays(model, [data[k] for k in keys], source=f"{flag} {path}")
    return NpzData(arrays=arrays, labels=data.get(labels_key) if labels_key else None, keys=keys)


def _listing(data: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in sorted(data.items())) or "nothing"


def is_array_data(data) -> bool:
    """An array, or a list/tuple/dict of arrays (as opposed to a dataset of batches)."""
    if isinstance(data, np.ndarray):
        return True
    if isinstance(data, Mapping):
        return all(isinstance(v, np.ndarray) for v in data.values())
    if isinstance(data, (list, tuple)):
        return bool(data) and all(isinstance(v, np.ndarray) for v in data)
    return False


def model_arrays(model: keras.Model, data, *, source: str = "data") -> list[np.ndarray]:
    """The arrays for each model input, in `model.inputs` order, checked: every input
    present, shapes and dtypes that fit, one sample count, at least one sample, no NaN
    or infinity. `data`: one array, a list in input order, or a dict by input name (an
    .npz may hold other arrays too, such as labels). Raises InputDataError."""
    specs = _specs(model, data)
    if isinstance(data, Mapping):
        missing = [name for name, _, _ in specs if name not in data]
        if missing:
            raise InputDataError(
                f"{source} has no array '{missing[0]}' for the model input of that name "
                f"(has: {', '.join(sorted(data)) or 'nothing'})"
            )
        arrays = [np.asarray(data[name]) for name, _, _ in specs]
    else:
        arrays = [np.asarray(a) for a in (data if isinstance(data, (list, tuple)) else [data])]
        if len(arrays) != len(specs):
            raise InputDataError(f"the model takes {len(specs)} inputs, {source} gives {len(arrays)} arrays")
    counts = {len(a) if a.ndim else 0 for a in arrays}
    for (name, shape, dtype), array in zip(specs, arrays):
        if shape is not None and not shape_fits(shape, tuple(array.shape)):
            raise InputDataError(
                f"input '{name}': the model expects shape {shape}, {source} holds {tuple(array.shape)}"
            )
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise InputDataError(f"input '{name}': {source} holds {array.dtype} values, not numbers")
        if dtype is not None and np.issubdtype(array.dtype, np.floating) != ("float" in dtype):
            raise InputDataError(f"input '{name}': the model expects {dtype}, {source} holds {array.dtype}")
        if array.ndim == 0 or len(array) == 0:
            raise InputDataError(f"input '{name}': {source} holds no samples (shape {tuple(array.shape)})")
        if np.issubdtype(array.dtype, np.floating):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise InputDataError(f"input '{name}': {source} holds {bad} NaN or infinite values")
    if len(counts) > 1:
        raise InputDataError(f"{source}: the inputs hold different numbers of samples ({sorted(counts)})")
    return [a.astype(dtype) if dtype is not None else a for a, (_, _, dtype) in zip(arrays, specs)]


def _specs(model, data) -> list[tuple[str, tuple | None, str | None]]:
    """(name, shape, dtype) per input; a subclassed model declares none, so its data is
    taken as given (one array or a list)."""
    try:
        return input_specs(model)
    except (AttributeError, ValueError):
        if isinstance(data, Mapping):
            return [(name, None, None) for name in data]
        count = len(data) if isinstance(data, (list, tuple)) else 1
        return [(f"input_{i}", None, None) for i in range(count)]


def array_batches(arrays: Sequence[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Consecutive batches of `batch_size` samples (the last may be smaller)."""
    for start in range(0, len(arrays[0]), batch_size):
        yield [a[start:start + batch_size] for a in arrays]


def dataset_batches(model: keras.Model, dataset: Iterable) -> Iterator[list[np.ndarray]]:
    """The batches of a tf.data.Dataset, a keras.utils.PyDataset or any iterable of
    batches, each checked like `model_arrays`. An element is `x` or `(x, y[, weights])`,
    unpacked as Keras's fit() unpacks it."""
    for index, element in enumerate(dataset):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(element)
        x = keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), x)
        yield model_arrays(model, x, source=f"batch {index} of the dataset")
