"""`fold_to_file`: fold, verify, save, reload what was saved and verify that too.

What is written is what was verified: the folded model is compared with the original,
then saved under a temporary name, loaded back as a user would load it, compared with
the verified folded model, and only then renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import keras

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.compare import (
    ComparisonReport,
    ExactArithmeticCheck,
    output_names,
    random_inputs,
)
from keras_bn_ext.folding import options
from keras_bn_ext.progress import phase
from keras_bn_ext.folding.fold import FoldReport, check_fold, fold_batchnorms
from keras_bn_ext.model_io import loadable_build_configs
from keras_bn_ext.stage import reloaded_keras_check, verify_and_commit

__all__ = ["FoldResult", "fold_to_file"]


@dataclass
class FoldResult:
    """What `fold_to_file` did. `output` is None when nothing was written."""

    fold: FoldReport
    verification: ComparisonReport  # the folded model against the original, float32
    output: str | None
    samples: int
    exact: ExactArithmeticCheck | None = None  # only when `verification` failed
    file_check: ComparisonReport | None = None  # the saved file, reloaded, against the folded model
    reload_error: str | None = None  # the saved file could not be loaded back
    # Layers saved without a build config so the file loads (`loadable_build_configs`).
    build_configs_dropped: list[str] = field(default_factory=list)
    # Why the fold with custom layers replaced by their traced graphs was given up for
    # one that keeps them (None when it was not tried, or it passed).
    inline_fallback: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def folded_ok(self) -> bool:
        return self.verification.passed or (self.exact is not None and self.exact.passed)

    @property
    def passed(self) -> bool:
        return (self.reload_error is None and self.folded_ok
                and (self.file_check is None or self.file_check.passed))

    def to_dict(self) -> dict:
        v = self.verification
        return {
            "output": self.output,
            **self.fold.to_dict(),
            "max_abs_err": v.max_abs_err,
            "max_rel_err": v.max_rel_err,
            "atol": v.atol,
            "rtol": v.rtol,
            "samples": self.samples,
            "passed": self.passed,
            "exact_arithmetic": self.exact.to_dict() if self.exact else None,
            "file_max_rel_err": self.file_check.max_rel_err if self.file_check else None,
            "reload_error": self.reload_error,
            "build_configs_dropped": self.build_configs_dropped,
            "inline_fallback": self.inline_fallback,
            "verification": v.to_dict(),
            "timings_s": self.timings_s,
        }


def fold_to_file(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    exclude: Sequence[str] = (),
    samples: int = options.SAMPLES,
    atol: float = options.ATOL,
    rtol: float = options.RTOL,
    safe_mode: bool = True,
    inline: bool = True,
) -> FoldResult:
    """Fold `model`'s BatchNormalization layers and write the result to `path` (.keras).

    The model is written even when nothing folds (then it is the same model, saved), so
    a pipeline `fold -> export` behaves the same on every model.

    The folded model is compared with the original on seeded random batches; an output
    passes when max|a-b| <= atol + rtol * max|reference|. When it does not, the fold is
    judged in exact arithmetic (`compare.fold_exact_check`): both models run in float64,
    and the fold passes when it changes the function less than float32 rounding already
    does in the original; a wrong fold (errors of order 1) does not.
    The file is then saved under a temporary name, loaded back as a user would load it,
    and its outputs compared with the folded model's before it is renamed into place.

    Args:
        model: A Functional or Sequential model; never changed.
        path: The output .keras file (replaced atomically; check it first with
            `model_io.check_output_path`).
        exclude: Names of BN layers to keep.
        samples: Seeded random batches (of `options.VERIFY_BATCH`) to compare on.
        atol, rtol: The tolerances above.
        safe_mode: How the written file is loaded back for its check (False where the
            model holds Lambda layers the user trusted).
        inline: Replace custom layers that hold BNs by their traced graphs so those
            BNs fold (`fold_batchnorms`); False keeps every custom layer's class.

    Returns:
        A FoldResult. Nothing is written when the fold fails both checks, when the file
        does not load back (`reload_error`) or when it computes something else. Where
        that happens with custom layers replaced by their traced graphs
        (`fold_batchnorms(inline=True)`), the fold is done again keeping them, and
        `inline_fallback` says why.
    """
    result = _fold_to_file(model, path, exclude=exclude, samples=samples, atol=atol, rtol=rtol,
                           safe_mode=safe_mode, inline=inline)
    if result.passed or not result.fold.inlined:
        return result
    why = result.reload_error or "the folded model did not pass verification"
    n_inlined = len(result.fold.inlined)
    result = _fold_to_file(model, path, exclude=exclude, samples=samples, atol=atol, rtol=rtol,
                           safe_mode=safe_mode, inline=False)
    result.inline_fallback = f"with {n_inlined} custom layers replaced by their graphs: {why}"
    return result


def _fold_to_file(model, path, *, exclude, samples, atol, rtol, safe_mode, inline) -> FoldResult:
    import time

    timings: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        with phase(name.replace("_", " ")):
            value = fn()
        timings[name] = round(time.perf_counter() - start, 4)
        return value

    from keras_bn_ext.folding.affine import is_batchnorm

    if not any(is_batchnorm(layer) for layer in internals.all_sublayers(model)):
        # Nothing to fold: the model itself is saved (no rebuild, which takes a minute on
        # a large BN-free net), and the file is still reloaded and checked against it.
        folded, report = model, FoldReport(params_before=model.count_params(), params_after=model.count_params())
    else:
        # Verified below, with the saved file (verify=False: not twice).
        folded, report = timed("fold", lambda: fold_batchnorms(model, exclude=exclude, inline=inline, verify=False))
    # One set of seeded batches for every check; each model runs on them once.
    batches = [random_inputs(model, batch_size=options.VERIFY_BATCH, seed=i) for i in range(samples)]
    names = output_names(model)

    fold_check = check_fold(model, folded, batches, atol=atol, rtol=rtol, timed=timed)
    folded_out = fold_check.folded_outputs
    result = FoldResult(fold=report, verification=fold_check.comparison, output=None, samples=samples,
                        timings_s=timings, exact=fold_check.exact)
    if not result.folded_ok:
        return result
    result.build_configs_dropped = loadable_build_configs(folded, leave=model)

    def check(tmp, _):
        checked = reloaded_keras_check(tmp, folded_out, batches, names, safe_mode=safe_mode, what="the folded model")
        if checked.reload_error is not None:
            checked.reload_error += _not_recreated_hint(report)
        return checked

    staged = verify_and_commit(path, folded.save, check, produce_name="save", check_name="verify_file",
                               check_phase="reload and verify the file")
    timings.update(staged.record.timings_s)
    result.file_check, result.reload_error = staged.check.comparison, staged.check.reload_error
    result.output = staged.record.output
    return result


def _not_recreated_hint(report: FoldReport) -> str:
    """Why a folded model may not load back: layers only their parent's constructor can make."""
    if not report.not_recreated:
        return ""
    names = ", ".join(report.not_recreated[:3])
    more = f" and {len(report.not_recreated) - 3} more" if len(report.not_recreated) > 3 else ""
    return f" (layers whose config does not recreate them, which only their parent's constructor can make: {names}{more})"
