"""`fold_batchnorms`: fold trained BatchNormalization layers into conv/dense weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import keras

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.compare import (
    ComparisonReport,
    ExactArithmeticCheck,
    compare_output_lists,
    fold_exact_check,
    keras_outputs,
    output_names,
    random_inputs,
)
from keras_bn_ext.errors import FoldError, UnknownLayerError
from keras_bn_ext.folding import options, rules
from keras_bn_ext.folding.affine import batchnorm_of, bn_affine, bn_axis, is_batchnorm
from keras_bn_ext.folding.analysis import analyze
from keras_bn_ext.folding.inline import InlineReport, inline_traceable_layers
from keras_bn_ext.rebuild import RebuildPlan, rebuild

__all__ = ["fold_batchnorms", "check_fold", "FoldCheck", "FoldReport", "FoldedBN", "KeptBN"]


@dataclass
class FoldedBN:
    bn: str
    into: str
    direction: str  # "backward": layer -> BN, into its output side; "forward": BN -> layer, its input side


@dataclass
class KeptBN:
    bn: str
    code: str  # stable: one of folding.analysis.KEPT_CODES
    reason: str  # the sentence, with layer names


@dataclass
class FoldReport:
    """What `fold_batchnorms` did: which BN went into which layer, which were kept and why."""

    folded: list[FoldedBN] = field(default_factory=list)
    kept: list[KeptBN] = field(default_factory=list)
    # BNs the model holds (e.g. in a KerasHub image encoder) but its graph never calls:
    # they compute nothing, and the folded model, built from the graph, has none of them.
    unused: list[KeptBN] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    # Custom layers replaced by the graph their call() traces (`folding.inline`).
    inlined: list[str] = field(default_factory=list)
    # Layers the folded model uses as they are, because their config does not recreate
    # them (a keras_hub bug, say): inference and export work, a saved file would not load.
    not_recreated: list[str] = field(default_factory=list)
    # `fold_batchnorms(verify=True)`: the folded model against the original on seeded
    # random batches, and the float64 judgement when float32 missed the tolerance.
    verification: ComparisonReport | None = None
    exact: ExactArithmeticCheck | None = None

    @property
    def bn_total(self) -> int:
        return len(self.folded) + len(self.kept) + len(self.unused)

    @property
    def bn_folded(self) -> int:
        return len(self.folded)

    def to_dict(self) -> dict:
        fields = asdict(self)
        fields.pop("verification"), fields.pop("exact")
        return {
            "bn_total": self.bn_total,
            "bn_folded": self.bn_folded,
            **fields,
            "verification": self.verification.to_dict() if self.verification else None,
            "exact_arithmetic": self.exact.to_dict() if self.exact else None,
        }


def _input_layout(d, scale, shift):
    """Per-channel scale/shift laid out as the forward target sees its input: per channel
    for a conv or a Dense on the last axis; per feature after a Flatten, in its order."""
    flattens = [t for t in d.through if isinstance(t, keras.layers.Flatten)]
    if not flattens:
        return scale, shift
    shape = tuple(d.feature_shape)
    axis = bn_axis(d.bn, len(shape) + 1) - 1  # axis within one example
    return (rules.per_feature(scale, shape, axis, flattens[0].data_format),
            rules.per_feature(shift, shape, axis, flattens[0].data_format))


def _fold_into(plan: RebuildPlan, layer, fold, scale, shift) -> None:
    """`layer` takes (scale, shift) on one side, over what it already took (a layer may
    take one BN on each side); the folded weights always carry a bias."""
    plan.new_weights[id(layer)] = fold(layer, scale, shift, plan.new_weights.get(id(layer)))
    plan.configs[id(layer)] = rules.with_bias(layer, plan.configs.get(id(layer)) or layer.get_config())


def _check_excluded(exclude, decisions) -> None:
    """Every name in `exclude` must be a BN of the model (its name, or its path inside a
    nested model): an unknown one would silently exclude nothing."""
    known = [d.path for d in decisions]
    names = set(known) | {d.bn.name for d in decisions}
    unknown = [name for name in exclude if name not in names]
    if unknown:
        listed = ", ".join(known) if known else "none"
        raise UnknownLayerError(
            f"exclude names no BatchNormalization layer of this model: {', '.join(map(repr, unknown))} "
            f"(its BatchNormalization layers: {listed}). Received: exclude={list(exclude)!r}",
            layer=unknown[0], known=known)


# The rebuild's layer-by-layer check runs on one seeded batch of this size.
_CHECK_BATCH = 2
_CHECK_SEED = 7919


def fold_batchnorms(
    model: keras.Model,
    *,
    exclude: tuple[str, ...] | list[str] = (),
    inline: bool = True,
    verify: bool = True,
    atol: float = options.ATOL,
    rtol: float = options.RTOL,
) -> tuple[keras.Model, FoldReport]:
    """Fold every BatchNormalization that the maths allows into its producer layer.

    A BN folds backward into the conv/dense layer that feeds it (Conv1D/2D/3D,
    grouped or not, DepthwiseConv1D/2D, SeparableConv1D/2D, Conv*Transpose,
    Dense, EinsumDense with a per-output-channel equation: the classes of
    `keras_bn_ext.folding.rules.RULES`) when that layer has a linear activation, is called once, feeds only
    this BN, is not a model output, and has its channel axis where the BN
    normalizes; the BN itself must be called once and not forced into training
    mode. BN layers from `keras.layers` and from `keras_bn_ext` both fold.

    Where backward folding is impossible (a BN after an activation, an Add, an
    input), the BN folds forward into the layer it feeds when that is exact: a
    Dense (directly on its last axis, or through Dropout/Flatten, in the Flatten's
    order), or a Conv1D/2D/3D, DepthwiseConv1D/2D or SeparableConv1D/2D with
    padding="valid" (padding would give border outputs 0 where the BN gave its
    shift), with the BN's output feeding only that chain.

    Args:
        model: A Functional or Sequential Keras model (models nested in it are
            folded too). It is never changed.
        exclude: Names of BN layers to keep as they are.
        inline: Replace each custom layer that holds BNs and whose call() traces
            symbolically by that graph (a nested Functional model of the same name),
            so its BNs fold too (`folding.inline`); the report lists them in
            `inlined`. False keeps every custom layer as it is.
        verify: Compare the folded model with the original on `options.SAMPLES`
            seeded random batches before returning it (an output passes when
            max|a-b| <= atol + rtol * max|reference|, NaN and inf in the same places;
            where float32 misses that, the float64 judgement decides,
            `compare.fold_exact_check`). False returns it unchecked (`fold_to_file`
            checks it itself). Either way every rebuilt layer that the fold does not
            change is checked against its original on the same inputs.
        atol, rtol: The tolerances of `verify`.

    Returns:
        `(folded_model, report)`. The folded model is a new model with the same
        layer names and classes minus the folded BN layers, loadable without
        keras_bn_ext when its only custom layers were keras_bn_ext BNs.

    Raises:
        UnsupportedModelError: a subclassed model, or a Sequential without input.
        InvalidBatchNormError: a BN with negative or non-finite variance.
        RebuildMismatchError: a layer rebuilt from its config and state computes
            something else than its original (state neither carries).
        FoldError: `verify` found the folded model off the original; `exc.report`.
        UnknownLayerError: a name in `exclude` is no BN of the model.
    """
    source, inlined = inline_traceable_layers(model) if inline else (model, InlineReport())
    decisions = analyze(source, exclude=frozenset(exclude), opaque=inlined.not_traced)
    _check_excluded(exclude, decisions)
    plan = RebuildPlan()
    report = FoldReport(params_before=model.count_params(), inlined=inlined.inlined)
    for d in decisions:
        if not d.folded:
            if d.bn.built:
                bn_affine(d.bn)  # a kept BN with a broken variance is still a broken model
            report.kept.append(KeptBN(bn=d.path, code=d.code, reason=d.reason))
            continue
        scale, shift = bn_affine(d.bn)
        plan.drop.add(id(d.bn))
        if d.keeps_name:
            plan.named_identity.add(id(d.bn))
        prefix = d.path[: len(d.path) - len(d.bn.name)]
        if d.slices:  # through a Concatenate: each input's producer takes its channels
            for layer, start, end in d.slices:
                _fold_into(plan, layer, rules.fold_backward, scale[start:end], shift[start:end])
            into = "+".join(prefix + layer.name for layer, _, _ in d.slices)
            report.folded.append(FoldedBN(bn=d.path, into=f"{into} (through {prefix + d.into.name})",
                                          direction=d.direction))
            continue
        if d.direction == "backward":
            _fold_into(plan, d.into, rules.fold_backward, scale, shift)
        else:
            _fold_into(plan, d.into, rules.fold_forward, *_input_layout(d, scale, shift))
        report.folded.append(FoldedBN(bn=d.path, into=prefix + d.into.name, direction=d.direction))
    decided = {id(d.bn) for d in decisions} | {id(batchnorm_of(d.bn)) for d in decisions}
    for layer in internals.all_sublayers(model):
        if is_batchnorm(layer) and id(layer) not in decided:
            decided.add(id(layer))
            report.unused.append(KeptBN(bn=layer.name, code="not_called", reason=(
                "held by the model but never called in its graph: it computes nothing, and the "
                "folded model (built from the graph) does not hold it")))
    check_batch = random_inputs(source, batch_size=_CHECK_BATCH, seed=_CHECK_SEED)
    folded = rebuild(source, plan, shared=report.not_recreated, check_inputs=check_batch)
    report.params_after = folded.count_params()
    if verify:
        _verify(model, folded, report, atol=atol, rtol=rtol)
    return folded, report


@dataclass
class FoldCheck:
    """A folded model against its original on seeded batches (`check_fold`)."""

    comparison: ComparisonReport  # float32 against float32
    exact: ExactArithmeticCheck | None  # the float64 judgement, only when `comparison` failed
    model_outputs: list  # per batch, so a caller (the saved file's check) need not run them again
    folded_outputs: list

    @property
    def passed(self) -> bool:
        return self.comparison.passed or (self.exact is not None and self.exact.passed)


def check_fold(model, folded, batches, *, atol: float, rtol: float, timed=None) -> FoldCheck:
    """The fold's verdict, shared by `fold_batchnorms(verify=True)` and `fold_to_file`: both
    models on `batches` (an output passes when max|a-b| <= atol + rtol * max|reference|,
    NaN/inf alike), and where float32 misses that, the float64 judgement
    (`compare.fold_exact_check`). `timed(name, fn)` wraps the two steps ("verify",
    "verify_float64") when given. `folded is model` (nothing to fold) runs it once."""
    timed = timed or (lambda _name, fn: fn())

    def outputs():
        model_out = [keras_outputs(model, b) for b in batches]
        return model_out, (model_out if folded is model else [keras_outputs(folded, b) for b in batches])

    model_out, folded_out = timed("verify", outputs)
    comparison = compare_output_lists(model_out, folded_out, output_names(model), atol=atol, rtol=rtol)
    exact = None if comparison.passed else timed("verify_float64", lambda: fold_exact_check(
        model, folded, batches, atol=atol, rtol=rtol, model_outputs=model_out, folded_outputs=folded_out))
    return FoldCheck(comparison, exact, model_out, folded_out)


def _verify(model, folded, report: FoldReport, *, atol: float, rtol: float) -> None:
    batches = [random_inputs(model, batch_size=options.VERIFY_BATCH, seed=i) for i in range(options.SAMPLES)]
    check = check_fold(model, folded, batches, atol=atol, rtol=rtol)
    report.verification, report.exact = check.comparison, check.exact
    if not check.passed:
        v, e = check.comparison, check.exact
        bad = f", {v.nonfinite_mismatches} NaN/inf where the original has none" if v.nonfinite_mismatches else ""
        judged = (f"candidate {e.candidate_max_rel_err:.3g}, original {e.original_max_rel_err:.3g}"
                  if e.reference_valid else e.reference_reason)
        raise FoldError(
            f"the folded model is not the original's function: max rel err {v.max_rel_err:.3g} on "
            f"{len(batches)} random batches (atol {atol:g}, rtol {rtol:g}){bad}, and float64 does not account for "
            f"it ({e.reference_code}: {judged})", report=report)
