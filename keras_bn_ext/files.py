"""The files a tool reads and writes, checked before any work and without importing Keras
or TensorFlow (numpy only) (so that a wrong path is an error in well under a second): a model file
(.keras archive or legacy H5), an output path, an .npz data file."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from keras_bn_ext.errors import InputDataError, ModelLoadError, OutputPathError

__all__ = ["H5_SUFFIXES", "check_model_file", "check_npz_file", "check_output_path", "load_npz"]


def check_model_file(path: str | os.PathLike) -> None:
    """Raise ModelLoadError unless `path` looks like a readable model file: a .keras
    archive, or a legacy Keras H5 file (.h5/.hdf5) that holds a model config."""
    _check_archive(Path(path))


H5_SUFFIXES = (".h5", ".hdf5")
_H5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_h5(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(8) != _H5_SIGNATURE:
            raise ModelLoadError(f"{path} is not an HDF5 file (no HDF5 signature)")
    import h5py  # Keras's own dependency for legacy H5

    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                raise ModelLoadError(
                    f"{path} holds only weights (no model config); save the whole model "
                    "(model.save) or rebuild it and load the weights in Python"
                )
    except OSError as exc:
        raise ModelLoadError(f"{path} is a damaged or truncated HDF5 file: {exc}") from exc


def _check_archive(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"no such file: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a .keras file")
    if path.suffix.lower() in H5_SUFFIXES:
        _check_h5(path)
        return
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a .keras file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelLoadError(f"{path} is damaged (bad CRC in {bad})")
            names = set(zf.namelist())
            if "config.json" not in names:
                raise ModelLoadError(f"{path} is not a .keras file (no config.json inside)")
            try:
                json.loads(zf.read("config.json"))
            except ValueError as exc:
                raise ModelLoadError(f"{path} has a broken config.json: {exc}") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelLoadError(f"{path} is damaged or truncated: {exc}") from exc


def check_output_path(
    output: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), force: bool = False
) -> Path:
    """Validate an output path before any work: never an input, never an existing file
    without `force`, and its folder must exist."""
    out = Path(output)
    for item in map(Path, inputs):
        same = out.resolve() == item.resolve() or (
            out.exists() and item.exists() and os.path.samefile(out, item)  # links too
        )
        if same:
            raise OutputPathError(f"output {out} is the input file {item}; choose another path")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutputPathError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise OutputPathError(f"output {out} is a directory")
    if out.exists() and not force:
        raise OutputPathError(f"output {out} exists; pass --force to overwrite it")
    return out


def check_npz_file(path: str | os.PathLike) -> None:
    """Raise InputDataError unless `path` is an existing .npz archive (its arrays are read later)."""
    if not os.path.exists(path):
        raise InputDataError(f"no such data file: {path}")
    if os.path.isdir(path):
        raise InputDataError(f"data file {path} is a directory")
    if not zipfile.is_zipfile(path):
        raise InputDataError(f"cannot read data file {path}: not an .npz archive (numpy.savez writes one)")


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file, by name. Pickled objects are never loaded."""
    # np.load would take a non-archive for a pickle (and refuse it as one): say what it is not.
    check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError as exc:
        raise InputDataError(f"no such data file: {path}") from exc
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputDataError(
                f"data file {path} holds Python objects (pickled arrays), which are never "
                "loaded; save plain numeric arrays with numpy.savez"
            ) from exc
        raise InputDataError(f"cannot read data file {path}: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise InputDataError(f"cannot read data file {path}: {exc}") from exc
