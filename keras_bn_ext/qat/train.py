"""`train_qat_to_file`: a trained classifier made quantization-aware, trained with `fit`, saved,
loaded back and checked: what `bn-qat` runs."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import keras
import numpy as np

from keras_bn_ext.compare import keras_outputs, output_names
from keras_bn_ext.progress import phase, steps
from keras_bn_ext.qat.model import quantize_model
from keras_bn_ext.qat.options import QatOptions
from keras_bn_ext.stage import reloaded_keras_check, verify_and_commit

__all__ = ["QatOptions", "QatResult", "QatTraining", "train_qat_to_file", "classifier_loss"]

# Batches of the evaluation data the reloaded file is compared on, bit for bit in float32.
_CHECK_SAMPLES = 256
_EVAL_BATCH = 256


@dataclass
class QatTraining:
    """What the training did, and the accuracy of the float model, the untrained and the
    trained QAT twin on the evaluation data (None without labels)."""

    epochs: int
    steps: int
    samples: int
    loss: str
    from_logits: bool | None
    seconds: float
    history: list[float] = field(default_factory=list)  # the loss after each epoch
    accuracy_float: float | None = None
    accuracy_qat_untrained: float | None = None
    accuracy_qat: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QatResult:
    """What `train_qat_to_file` did. `output` is None when nothing was written."""

    training: QatTraining
    options: QatOptions
    output: str | None
    file_check: object | None = None  # compare.ComparisonReport: the reloaded file vs the trained model
    reload_error: str | None = None

    @property
    def passed(self) -> bool:
        return self.reload_error is None and self.file_check is not None and self.file_check.passed

    def to_dict(self) -> dict:
        return {"output": self.output, "passed": self.passed,
                "file_max_rel_err": self.file_check.max_rel_err if self.file_check else None,
                "reload_error": self.reload_error, "options": asdict(self.options),
                "training": self.training.to_dict()}


def _probabilities(outputs: np.ndarray) -> bool:
    """Whether a classifier's outputs are probabilities (non-negative rows summing to 1)."""
    return bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-3))


def classifier_loss(model: keras.Model, sample: np.ndarray) -> tuple[object, str, bool | None]:
    """(loss, its name, from_logits): the model's compiled loss when it is a sparse categorical
    cross-entropy, else that loss on logits or probabilities as the model's outputs show
    (`sample`: a few real inputs)."""
    compiled = getattr(model, "loss", None)
    name = compiled if isinstance(compiled, str) else getattr(compiled, "name", "")
    if compiled is not None and "sparse_categorical" in str(name):  # integer labels, as bn-qat takes them
        return compiled, str(name), getattr(compiled, "from_logits", None)
    outputs = np.asarray(keras.ops.convert_to_numpy(model(sample, training=False)))
    from_logits = not _probabilities(outputs)
    return (keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
            "sparse_categorical_crossentropy", from_logits)


def _accuracy(model, x, y) -> float:
    predictions = np.concatenate([np.asarray(keras.ops.convert_to_numpy(model(x[i:i + _EVAL_BATCH], training=False)))
                                  for i in range(0, len(x), _EVAL_BATCH)])
    return float(np.mean(np.argmax(predictions, axis=-1) == y))


class _Progress(keras.callbacks.Callback):
    def __init__(self, advance):
        super().__init__()
        self.advance = advance

    def on_train_batch_end(self, batch, logs=None):
        self.advance()


def train_qat_to_file(model: keras.Model, data: tuple, path: str | os.PathLike, *, options: QatOptions = QatOptions(),
                      eval_data: tuple | None = None, safe_mode: bool = True) -> QatResult:
    """Make `model` quantization-aware (`quantize_model`), train it with `fit`, and write it.

    What is written is what was checked: the trained twin is saved under a temporary name,
    loaded back as a user would, and its outputs compared with the trained model's (1e-6:
    the same float32 graph and weights); only then is it renamed onto `path`.

    Args:
        model: A trained single-input classifier (never changed).
        data: (x, y): training inputs and integer labels.
        path: The output .keras file.
        options: `QatOptions`.
        eval_data: (x, y) for the accuracies, or None.
        safe_mode: How the written file is loaded back.
    """
    x, y = data
    calibration = x[:options.calibration_samples]
    loss, loss_name, from_logits = classifier_loss(model, x[:32])
    with phase("quantization-aware twin (calibrate the ranges)"):
        qat = quantize_model(model, calibration=calibration, weight_bits=options.weight_bits,
                             per_channel=options.per_channel, target=options.target,
                             bn_freeze_after=options.bn_freeze_after)
    training = QatTraining(epochs=options.epochs, steps=0, samples=len(x), loss=loss_name, from_logits=from_logits,
                           seconds=0.0)
    if eval_data is not None:
        with phase("accuracy before training"):
            training.accuracy_float = _accuracy(model, *eval_data)
            training.accuracy_qat_untrained = _accuracy(qat, *eval_data)
    qat.compile(optimizer=keras.optimizers.Adam(options.learning_rate), loss=loss)
    per_epoch = -(-len(x) // options.batch_size)
    start = time.perf_counter()
    with steps(f"train ({options.epochs} epoch{'s' * (options.epochs > 1)})", per_epoch * options.epochs) as advance:
        history = qat.fit(x, y, batch_size=options.batch_size, epochs=options.epochs, verbose=0,
                          callbacks=[_Progress(advance)])
    training.seconds = round(time.perf_counter() - start, 3)
    training.steps = per_epoch * options.epochs
    training.history = [float(v) for v in history.history.get("loss", [])]
    if eval_data is not None:
        with phase("accuracy after training"):
            training.accuracy_qat = _accuracy(qat, *eval_data)
    sample = (eval_data[0] if eval_data is not None else x)[:_CHECK_SAMPLES]
    expected = [keras_outputs(qat, [sample])]

    def check(tmp, _):
        return reloaded_keras_check(tmp, expected, [[sample]], output_names(qat), safe_mode=safe_mode)

    staged = verify_and_commit(path, qat.save, check, produce_name="save", check_name="verify_file",
                               check_phase="reload and verify the file")
    return QatResult(training=training, options=options, output=staged.record.output,
                     file_check=staged.check.comparison, reload_error=staged.check.reload_error)
