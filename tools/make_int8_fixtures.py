"""Train the small BN networks the INT8 tests and benchmarks judge quantization on.

Quantization is judged on trained networks and real digits only (random weights say
nothing about INT8 accuracy), and training in every test run would cost CI minutes, so
the trained models are committed: `tests/fixtures/int8/*.keras`, made by this script from
the shipped MNIST sample (tools/data/mnist-10k.npz) with fixed seeds. BN momentum is the
seed's 0.9 (Keras's 0.99 lags behind on 8,000 digits). All take 28x28x1 images named
`image`, so one calibration file and one evaluation file serve them all.

- `lenet_bn`: the seed's LeNet-BN (sigmoid), RMSprop, 3 epochs.
- `relu_lenet`: a ReLU LeNet variant (conv 32/64, dense 128), Adam, 2 epochs.
- `dwsep`: a depthwise-separable BN net at 32x32 (ZeroPadding2D to 32, conv stem,
  depthwise + pointwise blocks, global pooling), Adam, 3 epochs: the net where
  onnxruntime's default INT8 loses points on CPUs without VNNI.
- `wide_range`: `relu_lenet`'s trained weights with an exact rescaling applied: channel c
  of each BN before a ReLU is multiplied by s_c (log-uniform over 1e-2..1e2, positive) and
  the next layer's input weights of channel c divided by s_c. The function is unchanged
  (ReLU(s x) = s ReLU(x) for s > 0: verified below to 1e-5), but after folding each conv's
  per-channel weight ranges span four orders of magnitude, where per-tensor INT8 breaks
  and cross-layer equalization repairs it.

    python tools/make_int8_fixtures.py [--out tests/fixtures/int8]

Prints each net's test accuracy; `tests/fixtures/int8/README.md` records them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn_ext import BatchNormalization  # noqa: E402
from keras_bn_ext.lenet import lenet_bn  # noqa: E402
from keras_bn_ext.model_io import save_model_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "mnist-10k.npz"
OUT = HERE.parent / "tests" / "fixtures" / "int8"


def bn():
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)


def relu_lenet() -> keras.Sequential:
    return keras.Sequential([
        keras.Input((28, 28, 1), name="image"),
        keras.layers.Conv2D(32, 3, name="conv1"), bn(), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, name="conv2"), bn(), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, name="fc1"), bn(), keras.layers.ReLU(),
        keras.layers.Dense(10, activation="softmax", name="logits"),
    ], name="relu_lenet")


def dwsep() -> keras.Sequential:
    layers = [keras.Input((28, 28, 1), name="image"), keras.layers.ZeroPadding2D(2),
              keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False), bn(), keras.layers.ReLU()]
    for filters, stride in ((32, 1), (64, 2), (64, 1), (128, 2)):
        layers += [keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False), bn(),
                   keras.layers.ReLU(),
                   keras.layers.Conv2D(filters, 1, use_bias=False), bn(), keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")]
    return keras.Sequential(layers, name="dwsep")


def train(model, data, *, optimizer, epochs, seed):
    (x, y), _ = data
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


def accuracy(model, data) -> float:
    _, (x, y) = data
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1) == y))


def widen_ranges(model: keras.Sequential, *, seed: int) -> keras.Sequential:
    """The exact per-channel rescaling described in the module docstring: each BN that
    feeds a ReLU and then (through pooling/flatten) a conv or dense layer."""
    rng = np.random.default_rng(seed)
    wide = keras.models.clone_model(model)
    wide.set_weights(model.get_weights())
    layers = wide.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        nxt = next((lay for lay in layers[i + 1:] if isinstance(lay, (keras.layers.Conv2D, keras.layers.Dense))), None)
        if nxt is None:
            continue
        channels = layer.gamma.shape[0]
        s = 10.0 ** rng.uniform(-2, 2, channels)
        layer.gamma.assign(layer.gamma.numpy() * s)
        layer.beta.assign(layer.beta.numpy() * s)
        kernel = nxt.kernel.numpy()
        if isinstance(nxt, keras.layers.Dense) and kernel.shape[0] != channels:
            # After Flatten (channels_last): input index = position * channels + c.
            kernel = kernel.reshape(-1, channels, kernel.shape[-1]) / s[None, :, None]
            kernel = kernel.reshape(nxt.kernel.shape)
        else:
            kernel = kernel / s.reshape((1,) * (kernel.ndim - 2) + (channels, 1))
        nxt.kernel.assign(kernel)
    wide.name = "wide_range"
    return wide


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(DATA) as d:
        data = ((d["x_train"][..., None].astype("float32") / 255.0, d["y_train"]),
                (d["x_test"][..., None].astype("float32") / 255.0, d["y_test"]))
    nets = {}
    keras.utils.set_random_seed(1)
    nets["lenet_bn"] = train(lenet_bn(BatchNormalization), data, optimizer="rmsprop", epochs=3, seed=1)
    keras.utils.set_random_seed(2)
    nets["relu_lenet"] = train(relu_lenet(), data, optimizer="adam", epochs=2, seed=2)
    keras.utils.set_random_seed(3)
    nets["dwsep"] = train(dwsep(), data, optimizer="adam", epochs=3, seed=3)
    nets["wide_range"] = widen_ranges(nets["relu_lenet"], seed=4)
    x_test = data[1][0][:512]
    diff = np.max(np.abs(nets["wide_range"].predict(x_test, verbose=0) - nets["relu_lenet"].predict(x_test, verbose=0)))
    assert diff < 1e-5, f"the rescaling changed the function by {diff}"
    for name, model in nets.items():
        # Uncompiled copies: the file holds the network, not the optimizer's state.
        plain = keras.models.clone_model(model)
        plain.set_weights(model.get_weights())
        save_model_atomic(plain, out / f"{name}.keras")
        print(f"{name}: test accuracy {accuracy(model, data):.4f}, {model.count_params():,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
