"""Export targets. Each target converts a (folded) Keras model into a file and verifies
that file's outputs against the Keras model on the target's own runtime.

ONNX (`keras_bn_ext.export.onnx`) is the first; a second target (TFLite, say) is a
sibling package with the same two steps, and reuses `folding` and `compare`.
"""
