"""Export targets. Each target converts a (folded) Keras model into a file and verifies
that file's outputs against the Keras model on the target's own runtime.

A target is one registered unit (`export.target`: `Target`, `TARGETS`): ONNX
(`export.onnx`), LiteRT (`export.litert`) and OpenVINO (`export.openvino`). The float
driver (`export.driver.export_verified`), the shared verification (`export.verify`), the
child-process protocol (`export.runner`) and the options (`export.options`) serve all of
them; a fourth target is one folder and one line in `export.target.TARGETS`.
"""
