"""Helpers for checking a BN pipeline: give every BatchNormalization non-trivial
statistics, then fold/export and compare.

A freshly built model's BNs hold mean 0, variance 1, gamma 1 and beta 0: an identity
map, so a fold that puts the scale in the wrong place still "passes". Randomize first.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.folding.affine import is_batchnorm

__all__ = [
    "APPLICATIONS",
    "RESIDUAL_GAMMA",
    "application_model",
    "batchnorm_layers",
    "count_batchnorms",
    "kerashub_backbones",
    "wrapper_models",
    "randomize_batchnorms",
    "residual_branch_batchnorms",
]


def batchnorm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every BatchNormalization (Keras's or keras_bn_ext's) in `model`, at any depth,
    including BNs held inside custom layers."""
    return [layer for layer in internals.all_sublayers(model) if is_batchnorm(layer)]


def count_batchnorms(model: keras.Model) -> int:
    return len(batchnorm_layers(model))


def randomize_batchnorms(model: keras.Model, seed: int = 0, *, residual_gamma: tuple | None = None) -> None:
    """Give every built BN of `model` (nested ones too) random gamma in [0.5, 1.5], beta
    and moving mean ~ N(0, 0.2), and moving variance in [0.5, 1.5]. Changes `model`.

    Args:
        residual_gamma: (low, high): gamma of the BNs that close a residual branch
            (`residual_branch_batchnorms`) is drawn from this range instead. A deep
            untrained residual network whose branches enter the sum at full strength
            multiplies every perturbation by ~sqrt(2) per block: EfficientNetV2S with
            weights=None moves its outputs by 64% for a 1e-6 change of its input, so its
            own float32 run is that far from float64 and no fold can be verified on it.
            Trained residual networks keep those gammas small (training starts them at
            zero: Goyal et al. 2017, torchvision's zero_init_residual); with (0.05, 0.25)
            the same model moves by 3e-7.
    """
    rng = np.random.default_rng(seed)
    closing = {id(layer) for layer in residual_branch_batchnorms(model)} if residual_gamma else set()
    for layer in batchnorm_layers(model):
        if not layer.built:
            continue
        c = layer.moving_mean.shape[0]
        values = {}
        if layer.scale:
            values["gamma"] = rng.uniform(*(residual_gamma if id(layer) in closing else (0.5, 1.5)), c)
        if layer.center:
            values["beta"] = rng.normal(0, 0.2, c)
        values["moving_mean"] = rng.normal(0, 0.2, c)
        values["moving_variance"] = rng.uniform(0.5, 1.5, c)
        if getattr(layer, "renorm", False):  # batch renormalization's extra statistics
            values["moving_stddev"] = np.sqrt(values["moving_variance"])
            values["renorm_mean"] = rng.normal(0, 0.2, c)
            values["renorm_stddev"] = rng.uniform(0.7, 1.2, c)
        for name, value in values.items():
            variable = getattr(layer, name)
            variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


# Layers that pass a branch on to the sum unchanged at inference.
_PASS_THROUGH = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                 "GaussianNoise", "AlphaDropout", "Identity", "StochasticDepth")


def residual_branch_batchnorms(model: keras.Model) -> list[keras.layers.Layer]:
    """The BNs whose output goes, through dropout-like layers only, into a sum of
    several tensors (an `Add` layer or a `+` on symbolic tensors): the last BN of a
    residual branch, and of a projection shortcut (ResNet's `_0_bn`). Looks into
    nested Functional/Sequential models, whose outputs may be summed by their caller."""
    from keras_bn_ext.graph import GraphIndex, graph_of, is_rebuildable_model

    found = []

    def visit(graph, outputs_reach_sum=()):
        index = GraphIndex(graph)
        # A nested model's output that its caller adds to something.
        summed_outputs = {id(t) for t, summed in zip(graph.outputs, outputs_reach_sum) if summed}

        def reaches_sum(tensor) -> bool:
            if id(tensor) in summed_outputs:
                return True
            for node in index.consumers.get(id(tensor), ()):
                kind = type(internals.node_operation(node)).__name__
                if kind == "Add" and len(internals.node_inputs(node)) > 1:
                    return True
                if kind in _PASS_THROUGH and internals.node_outputs(node) and reaches_sum(internals.node_outputs(node)[0]):
                    return True
            return False

        for node in index.nodes:
            layer = internals.node_operation(node)
            if layer is None or internals.node_is_input(node):
                continue
            if is_batchnorm(layer) and layer not in found and reaches_sum(internals.node_outputs(node)[0]):
                found.append(layer)
            elif is_rebuildable_model(layer):
                visit(graph_of(layer), [reaches_sum(t) for t in internals.node_outputs(node)])

    if is_rebuildable_model(model):
        visit(graph_of(model))
    return found


# -- models nobody on the team wrote ------------------------------------------------------

def _smallest(builder, sizes=(32, 48, 64, 75, 96, 128, 224)):
    """Build with the smallest square input the architecture accepts."""
    errors = []
    for size in sizes:
        try:
            return builder(size)
        except ValueError as exc:  # "Input size must be at least ..."
            errors.append(str(exc))
    raise ValueError(f"no input size in {sizes} fits: {errors[-1]}")


# Gamma of the BN closing a residual branch in the models below: as trained networks
# have it (see randomize_batchnorms).
RESIDUAL_GAMMA = (0.05, 0.25)

# keras.applications models that contain BatchNormalization (VGG and ConvNeXt do not).
APPLICATIONS = (
    "DenseNet121", "DenseNet169", "DenseNet201",
    "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3",
    "EfficientNetB4", "EfficientNetB5", "EfficientNetB6", "EfficientNetB7",
    "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3",
    "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L",
    "InceptionResNetV2", "InceptionV3",
    "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
    "NASNetMobile", "NASNetLarge",
    "ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2", "ResNet152V2",
    "Xception",
)


def application_model(name: str) -> keras.Model:
    """`keras.applications.<name>(weights=None)` at the smallest input it accepts, with
    random BN statistics. The head returns logits: with random statistics a softmax
    saturates and turns float32 rounding of large logits into large probability errors."""
    constructor = getattr(keras.applications, name)
    model = _smallest(lambda size: constructor(weights=None, input_shape=(size, size, 3),
                                               classifier_activation=None))
    randomize_batchnorms(model, residual_gamma=RESIDUAL_GAMMA)
    return model


def kerashub_backbones() -> dict:
    """Small KerasHub vision backbones built from their constructors (never presets:
    those download weights), as name -> zero-argument builder. Needs keras_hub."""
    import keras_hub

    m = keras_hub.models

    def resnet(block_type, pre_activation=False):
        return lambda: m.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
            stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type=block_type,
            use_pre_activation=pre_activation, image_shape=(32, 32, 3))

    def cspnet(block_type):
        return lambda: m.CSPNetBackbone(
            stem_filters=16, stem_kernel_size=3, stem_strides=1, stackwise_strides=2,
            stackwise_depth=[1, 1], stackwise_num_filters=[16, 24], image_shape=(32, 32, 3),
            down_growth=True, bottle_ratio=(0.5, 1.0), block_ratio=(1.0, 0.5), expand_ratio=(2.0, 1.0),
            block_type=block_type, stage_type="csp", stem_padding="same")

    return {
        "ResNetBackbone basic": resnet("basic_block"),
        "ResNetBackbone basic vd": resnet("basic_block_vd"),
        "ResNetBackbone bottleneck pre-activation": resnet("bottleneck_block", pre_activation=True),
        "CSPNetBackbone dark": cspnet("dark_block"),
        "CSPNetBackbone bottleneck": cspnet("bottleneck_block"),
        "EfficientNetBackbone": lambda: m.EfficientNetBackbone(
            stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
            stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1], stackwise_input_filters=[16, 16],
            stackwise_output_filters=[16, 24], stackwise_expansion_ratios=[1, 4],
            stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2],
            stackwise_block_types=["v1", "v1"], stackwise_force_input_filters=[0, 0],
            stackwise_nores_option=[False, False], input_shape=(32, 32, 3), num_features=64),
        "DenseNetBackbone": lambda: m.DenseNetBackbone(
            stackwise_num_repeats=[1, 1], image_shape=(32, 32, 3), growth_rate=8),
        "XceptionBackbone": lambda: m.XceptionBackbone(
            stackwise_conv_filters=[[32, 64], [64, 128], [256, 256]], stackwise_pooling=[True, True, False],
            image_shape=(64, 64, 3)),
        "MobileNetBackbone (V3)": lambda: m.MobileNetBackbone(
            stackwise_expansion=[[40, 56], [64, 144]], stackwise_num_blocks=[2, 2],
            stackwise_num_filters=[[16, 16], [24, 24]], stackwise_kernel_size=[[3, 3], [5, 5]],
            stackwise_num_strides=[[2, 1], [2, 1]], stackwise_se_ratio=[[None, None], [0.25, 0.25]],
            stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"], ["hard_swish"]],
            stackwise_padding=[[1, 1], [2, 2]], output_num_filters=64, input_activation="hard_swish",
            output_activation="hard_swish", input_num_filters=16, image_shape=(32, 32, 3),
            depthwise_filters=8, depthwise_stride=2, depthwise_residual=False, squeeze_and_excite=0.5,
            last_layer_filter=48),
        "HGNetV2Backbone": lambda: m.HGNetV2Backbone(
            embedding_size=32, stem_channels=[3, 16, 32], hidden_act="relu", use_learnable_affine_block=False,
            image_shape=(64, 64, 3), depths=[1, 1], hidden_sizes=[64, 128],
            stackwise_stage_filters=[[32, 16, 64, 1, 1, 3], [64, 32, 128, 1, 1, 3]],
            apply_downsample=[False, True], use_lightweight_conv_block=[False, True]),
        "RetinaNetBackbone (FPN with BN)": lambda: m.RetinaNetBackbone(
            image_encoder=m.ResNetBackbone(
                input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16, 16, 16],
                stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block"),
            min_level=3, max_level=5, use_p5=False, use_fpn_batch_norm=True, image_shape=(64, 64, 3)),
        "DeepLabV3Backbone": lambda: m.DeepLabV3Backbone(
            image_encoder=m.ResNetBackbone(
                input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16, 16],
                stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2], block_type="basic_block"),
            low_level_feature_key="P2", spatial_pyramid_pooling_key="P4", dilation_rates=[6, 12],
            upsampling_size=4, image_shape=(64, 64, 3)),
    }


def wrapper_models() -> dict:
    """Sequence and video models of Keras layers around TimeDistributed, as name ->
    zero-argument builder (BN statistics left at their initial values): where BNs fold
    through a wrapper."""
    layers = keras.layers

    def deepspeech():
        # Conv1D -> BN -> ReLU -> GRU -> BN -> TimeDistributed(Dense) -> BN -> ReLU -> Dense.
        inputs = keras.Input((20, 13), name="features")
        h = layers.ReLU()(layers.BatchNormalization(name="bn_conv")(layers.Conv1D(16, 5, name="conv")(inputs)))
        h = layers.BatchNormalization(name="bn_gru")(layers.GRU(12, return_sequences=True, name="gru")(h))
        h = layers.TimeDistributed(layers.Dense(24), name="td_dense")(h)
        h = layers.ReLU()(layers.BatchNormalization(name="bn_td")(h))
        return keras.Model(inputs, layers.Dense(10, name="logits")(h), name="deepspeech_like")

    def video(wrapped_bn: bool):
        # TimeDistributed(Conv2D) -> BN -> ReLU -> TimeDistributed(Conv2D) -> BN (or a
        # TimeDistributed(BN)) -> ReLU -> per-frame pooling -> LSTM -> Dense.
        inputs = keras.Input((4, 12, 12, 3), name="clip")
        h = layers.TimeDistributed(layers.Conv2D(6, 3), name="td_c1")(inputs)
        h = layers.ReLU()(layers.BatchNormalization(name="bn1")(h))
        h = layers.TimeDistributed(layers.Conv2D(8, 3), name="td_c2")(h)
        bn = layers.BatchNormalization(name="bn2")
        h = layers.ReLU()((layers.TimeDistributed(bn, name="td_bn2") if wrapped_bn else bn)(h))
        h = layers.TimeDistributed(layers.GlobalAveragePooling2D(), name="td_pool")(h)
        return keras.Model(inputs, layers.Dense(3, name="action")(layers.LSTM(6, name="lstm")(h)), name="video")

    return {
        "DeepSpeech-like (GRU, TimeDistributed(Dense))": deepspeech,
        "Video (TimeDistributed(Conv2D), BN)": lambda: video(False),
        "Video (TimeDistributed(Conv2D), TimeDistributed(BN))": lambda: video(True),
    }

