"""bn-fold: fold trained BatchNormalization into conv/dense weights, verified."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keras_bn_ext.cli._args import EXIT_CODES_HELP, Parser, add_common_arguments, add_recalibration_arguments
from keras_bn_ext.cli._inputs import load_input_model, preflight
from keras_bn_ext.cli._output import exact_line, fmt, verdict
from keras_bn_ext.cli._run import EXIT_OK, EXIT_VERIFY_FAILED, run, timed
from keras_bn_ext.folding import options

PROG = "bn-fold"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Fold trained BatchNormalization layers into the neighbouring "
        "conv/dense layers of a .keras (or legacy .h5) model, save it, load the saved file back and verify "
        "it gives the same inference outputs as the original.",
        epilog=EXIT_CODES_HELP,
    )
    add_common_arguments(
        parser,
        atol=options.ATOL,
        rtol=options.RTOL,
        samples_help=f"seeded random batches of {options.VERIFY_BATCH} to verify on "
        f"(default: {options.SAMPLES})",
    )
    parser.add_argument("-o", "--output", help="output .keras file (default: MODEL.folded.keras beside the input)")
    parser.add_argument("--keep-custom-layers", action="store_true",
                        help="keep each custom layer's class; by default one that holds BNs and whose call() "
                             "traces symbolically is replaced by that graph, so its BNs fold")
    add_recalibration_arguments(
        parser, flag="--recalibrate", prefix="recalibrate-",
        data_help="first set every BN's statistics from these real inputs (AdaBN, as bn-recalibrate "
                  "does: an .npz with one array per model input, named after it), then fold; the fold "
                  "is verified against the recalibrated model")
    return parser


def default_output(model_path: str) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}.folded.keras")


def _work(args) -> int:
    output = Path(args.output) if args.output else default_output(args.model)
    preflight(args, output, data_files=[args.data])  # before TensorFlow is imported
    from keras_bn_ext.folding.save import fold_to_file

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.data])
    from keras_bn_ext.testing import count_batchnorms

    if count_batchnorms(model) == 0:
        # Said at once (a BN-free net used to spend a minute folding before saying so);
        # the model is still saved and checked, so a pipeline fold -> export runs the same.
        print(f"{PROG}: {args.model} holds no BatchNormalization layer: nothing to fold; it is saved as it is",
              file=sys.stderr, flush=True)
    recalibration = None
    if args.data:
        from keras_bn_ext.cli._inputs import recalibration_data
        from keras_bn_ext.recalibration import recalibrate_batchnorms

        with timed(seconds, "recalibrate"):
            recalibration = recalibrate_batchnorms(
                model, recalibration_data(model, args, flag="--recalibrate"), mode=args.mode, batch_size=args.batch_size,
                include_frozen=not args.keep_frozen)
    result = fold_to_file(model, output, exclude=args.exclude, samples=args.samples,
                          atol=args.atol, rtol=args.rtol, safe_mode=not args.unsafe,
                          inline=not args.keep_custom_layers)
    result.timings_s = {**seconds, **result.timings_s}
    report = {"input": str(args.model), **result.to_dict(),
              "recalibration": recalibration.to_dict() if recalibration else None}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if recalibration is not None:
            from rich.console import Console

            from keras_bn_ext.cli.recalibrate import print_recalibration

            print_recalibration(Console(), recalibration)
        _print_summary(result, model_path=str(args.model))
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def _print_summary(outcome, *, model_path: str) -> None:
    """The table of a `FoldResult`, read from its typed fields."""
    from rich.console import Console
    from rich.table import Table

    report, comparison = outcome.fold, outcome.verification
    console = Console()
    table = Table(title=f"BatchNormalization in {model_path}")
    table.add_column("BN")
    table.add_column("folded into")
    table.add_column("direction / reason")
    for f in report.folded:
        table.add_row(f.bn, f.into, f.direction)
    for k in report.kept:
        table.add_row(k.bn, "[yellow]kept[/yellow]", k.reason)
    for k in report.unused:
        table.add_row(k.bn, "[dim]unused[/dim]", k.reason)
    if report.bn_total:
        console.print(table)
    if report.inlined:
        console.print(f"custom layers replaced by the graph their call() traces: {', '.join(report.inlined)}")
    if outcome.inline_fallback:
        console.print(f"[yellow]custom layers kept: {outcome.inline_fallback}[/yellow]")
    console.print(
        f"BN layers: {report.bn_total} -> {report.bn_total - report.bn_folded} "
        f"({report.bn_folded} folded); parameters: {report.params_before:,} -> {report.params_after:,}"
    )
    result_text = verdict(comparison.passed, "above tolerance")
    console.print(
        f"folded vs original on {comparison.batches} random batches: max abs err "
        f"{fmt(comparison.max_abs_err)}, max rel err {fmt(comparison.max_rel_err)} "
        f"(atol {fmt(comparison.atol)}, rtol {fmt(comparison.rtol)}): {result_text}"
    )
    if outcome.exact is not None:
        console.print(exact_line(outcome.exact, original="original", candidate="folded", what="the fold"))
    for line in outcome.build_configs_dropped:
        console.print(f"  {line}")
    if outcome.file_check is not None:
        result_text = verdict(outcome.file_check.passed)
        console.print(f"the saved file, reloaded, vs the folded model: max rel err "
                      f"{fmt(outcome.file_check.max_rel_err)}: {result_text}")
    if outcome.reload_error:
        console.print(f"[red]{outcome.reload_error}; nothing written[/red]")
    elif outcome.output:
        nothing = "nothing to fold; the model is saved unchanged: " if report.bn_folded == 0 else ""
        console.print(f"{nothing}wrote {outcome.output}")
    else:
        console.print("[red]verification failed; nothing written[/red]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: _work(args), debug=args.debug, show_progress=not args.json,
               json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
