"""Folding trained BatchNormalization into neighbouring conv/dense layers.

`analysis` decides what folds, `rules` holds the per-layer-class maths, `affine` turns a
BN into its per-channel map, `inline` opens traceable custom layers, `fold` ties them
together (the new model is written by the package's `rebuild`), `save` writes it verified.
"""

from keras_bn_ext._lazy import lazy_attributes

_EXPORTS = {name: "keras_bn_ext.folding.fold" for name in ("FoldedBN", "FoldReport", "KeptBN", "fold_batchnorms")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
