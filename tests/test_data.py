"""The one data-file convention of every tool (`data.npz_data`): keyed by InputLayer name, or
`--data-key`, or for a one-input model a single array or Keras's mnist.npz layout."""

import numpy as np
import pytest
import keras

from keras_bn_ext.data import npz_data
from keras_bn_ext.errors import InputDataError


def _model(inputs=1):
    xs = [keras.Input((4,), name=f"in{i}") for i in range(inputs)]
    y = keras.layers.Dense(3)(xs[0] if inputs == 1 else keras.layers.Concatenate()(xs))
    return keras.Model(xs, y)


def _x(n=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")


def test_keyed_by_input_name_with_labels(tmp_path):
    path = tmp_path / "d.npz"
    x, y = _x(), np.arange(5) % 3
    np.savez(path, in0=x, labels=y, unrelated=np.zeros(2))
    got = npz_data(_model(), path)
    assert got.keys == ["in0"] and np.array_equal(got.arrays[0], x) and np.array_equal(got.labels, y)


def test_one_array_besides_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, features=_x(), labels=np.zeros(5, "int64"))
    got = npz_data(_model(), path)
    assert got.keys == ["features"] and got.labels is not None


@pytest.mark.parametrize("split,n", [("train", 6), ("test", 3)])
def test_keras_mnist_layout_picks_the_split_and_its_labels(tmp_path, split, n):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=_x(6), y_train=np.zeros(6, "int64"), x_test=_x(3, 1), y_test=np.ones(3, "int64"))
    got = npz_data(_model(), path, split=split)
    assert got.keys == [f"x_{split}"] and len(got.arrays[0]) == n and len(got.labels) == n


def test_data_key_on_the_mnist_layout_takes_the_labels_beside_it(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=_x(6), y_train=np.zeros(6, "int64"), x_test=_x(3, 1), y_test=np.ones(3, "int64"))
    got = npz_data(_model(), path, key="x_test")
    assert got.keys == ["x_test"] and np.array_equal(got.labels, np.ones(3, "int64"))


def test_data_key_picks_an_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=_x(), b=_x(5, 1))
    got = npz_data(_model(), path, key="b")
    assert np.array_equal(got.arrays[0], _x(5, 1)) and got.labels is None


def test_ambiguous_file_names_what_it_has_and_what_to_pass(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=_x(), b=_x())
    with pytest.raises(InputDataError) as info:
        npz_data(_model(), path, flag="--int8")
    message = str(info.value)
    assert "--int8" in message and "has no array 'in0'" in message and "a (5, 4) float32" in message
    assert "numpy.savez('d.npz', in0=...)" in message and "--data-key" in message


def test_data_key_is_refused_for_a_two_input_model_and_when_absent(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, in0=_x(), in1=_x())
    assert [a.shape for a in npz_data(_model(2), path).arrays] == [(5, 4), (5, 4)]
    with pytest.raises(InputDataError, match="one-input models; this one has 2 inputs"):
        npz_data(_model(2), path, key="in0")
    with pytest.raises(InputDataError, match="has no array 'zz'.*Received: data_key='zz'"):
        npz_data(_model(), path, key="zz")


def test_the_arrays_are_still_checked_against_the_model(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((5, 3), "float32"))
    with pytest.raises(InputDataError, match=r"expects shape \(None, 4\)"):
        npz_data(_model(), path)
