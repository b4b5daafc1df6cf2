"""A quantization-aware model's LiteRT file from its learned ranges (`export.litert.qat`):
the converter reads the activation markers and the grid kernels, the file runs on
ai-edge-litert's integer kernels and is judged against the QAT model's own simulation on
real digits; grids the converter would round again are refused."""

import json

import keras
import numpy as np
import pytest

from keras_bn_ext.qat import quantize_model
from tests.helpers import int8_fixture, mnist_digits, run_python

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the LiteRT converter is TensorFlow's")


def _weight_scales(path) -> list[int]:
    """How many scales each convolution's int8 weight holds in the file, as the interpreter
    reads it (a process of its own: LiteRT and TensorFlow never share one)."""
    out = run_python(
        "import json\n"
        "from ai_edge_litert import interpreter as litert\n"
        f"it = litert.Interpreter(model_path={str(path)!r}, experimental_op_resolver_type="
        "litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)\n"
        "it.allocate_tensors(); t = {d['index']: d for d in it.get_tensor_details()}\n"
        "print(json.dumps([[op['op_name'], t[op['inputs'][1]]['dtype'].__name__, "
        "len(t[op['inputs'][1]]['quantization_parameters']['scales'])] for op in it._get_ops_details() "
        "if op['op_name'] in ('CONV_2D', 'DEPTHWISE_CONV_2D')]))\n")
    return json.loads(out.strip().splitlines()[-1])


def test_per_tensor_twin_file_holds_its_own_grid_and_matches_its_simulation(tmp_path):
    """Per tensor, the converter would pick one scale per channel of its own (re-rounding
    the trained integers); the grid kernels' FakeQuant makes it keep the trained one. On
    the 2,000 test digits: top-1 agreement with the QAT model >= 99.5%, accuracy within
    0.3 pt (measured: 99.85%, 94.80% simulated vs 94.75%, 46.6 dB)."""
    from keras_bn_ext.export.int8 import export_int8

    (x_train, y_train), (x_test, y_test) = mnist_digits()
    qat = quantize_model(int8_fixture("dwsep"), calibration=x_train[:512], per_channel=False, target="litert")
    qat.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    qat.fit(x_train[:1600], y_train[:1600], batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "dwsep.qat.int8.tflite"
    result = export_int8(qat, path, None, target="litert", eval_data=[x_test], labels=y_test)
    out = result.fidelity.outputs[0]
    assert result.passed and result.calibration.learned and result.detail.per_channel is False
    assert out.top1_agreement >= 0.995, out
    assert abs(out.accuracy_quantized - out.accuracy_float) <= 0.003, out
    scales = _weight_scales(path)
    assert len(scales) == 9 and all(dtype == "int8" and n == 1 for _, dtype, n in scales), scales


def test_grids_litert_cannot_hold_are_refused(tmp_path, capsys):
    """4-bit weights (no builtin int4 kernel) and 7-bit ones (a CPU without VNNI's ONNX
    twin): refused in one line, nothing written, never rounded again."""
    from keras_bn_ext.cli import export_litert

    (x_train, _), (x_test, y_test) = mnist_digits()
    model = int8_fixture("dwsep")
    with pytest.raises(ValueError, match="Received: weight_bits=4, target='litert'"):
        quantize_model(model, calibration=x_train[:64], weight_bits=4, target="litert")
    np.savez(tmp_path / "eval.npz", image=x_test[:200], labels=y_test[:200])
    for bits, cpu in ((4, "auto"), (8, "avx2")):
        qat = quantize_model(model, calibration=x_train[:64], weight_bits=bits, target_cpu=cpu)
        qat.save(tmp_path / f"w{bits}.qat.keras")
        out = tmp_path / f"w{bits}.tflite"
        code = export_litert.main([str(tmp_path / f"w{bits}.qat.keras"), "--eval", str(tmp_path / "eval.npz"),
                                   "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "round again" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
