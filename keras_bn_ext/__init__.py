"""keras-bn-ext: batch normalization for Keras 3 users who ship their models.

- `BatchNormalization`: a from-scratch BN layer, interchangeable with Keras's.
- `reference.batch_norm`: the numpy reference it is tested against.
"""

from keras_bn_ext.batch_normalization import BatchNormalization

__version__ = "0.1.0"

__all__ = ["BatchNormalization", "__version__"]
