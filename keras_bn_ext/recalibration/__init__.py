"""Re-estimating BatchNormalization statistics from real data (AdaBN, `update_bn`).

`statistics` reads each BN's inputs and sets its moving mean and variance; `save` writes
the recalibrated model and checks the written file; `options` holds the modes (light).
"""

from keras_bn_ext._lazy import lazy_attributes

_EXPORTS = {
    **{name: "keras_bn_ext.recalibration.statistics"
       for name in ("BNRecalibration", "RecalibrationReport", "SkippedBN", "recalibrate_batchnorms")},
    **{name: "keras_bn_ext.recalibration.save" for name in ("RecalibrationResult", "recalibrate_to_file")},
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
