"""bn-recalibrate: re-estimate BatchNormalization statistics from real data, verified."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keras_bn_ext.cli._args import EXIT_CODES_HELP, Parser, add_model_arguments, add_recalibration_arguments
from keras_bn_ext.cli._inputs import load_input_model, preflight
from keras_bn_ext.cli._output import fmt, verdict
from keras_bn_ext.cli._run import EXIT_OK, EXIT_VERIFY_FAILED, run, timed

PROG = "bn-recalibrate"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Set the moving mean and variance of every BatchNormalization layer of a "
        ".keras (or legacy .h5) model from real data (AdaBN; what Keras lacks as update_bn), save "
        "it, load the saved file back and check it holds the new statistics and computes what "
        "the recalibrated model computes.",
        epilog=EXIT_CODES_HELP,
    )
    add_model_arguments(parser)
    add_recalibration_arguments(
        parser, flag="--data",
        data_help="real input samples: an .npz with one array per model input, named after it, "
                  "samples on axis 0 (other arrays, e.g. labels, are ignored)")
    parser.add_argument("-o", "--output",
                        help="output .keras file (default: MODEL.recalibrated.keras beside the input)")
    return parser


def default_output(model_path: str) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}.recalibrated.keras")


def _work(args) -> int:
    output = Path(args.output) if args.output else default_output(args.model)
    preflight(args, output, data_files=[args.data])  # before TensorFlow is imported
    from keras_bn_ext.cli._inputs import recalibration_data
    from keras_bn_ext.recalibration import recalibrate_to_file

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.data])
        data = recalibration_data(model, args)
    with timed(seconds, "recalibrate_save_verify"):
        result = recalibrate_to_file(model, data, output, mode=args.mode, batch_size=args.batch_size,
                                     include_frozen=not args.keep_frozen, safe_mode=not args.unsafe)
    report = {"input": str(args.model), "data": str(args.data), **result.to_dict(), "timings_s": seconds}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(result)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def print_recalibration(console, report) -> None:
    """The per-BN table of a RecalibrationReport (bn-fold --recalibrate prints it too)."""
    from rich.table import Table

    table = Table(title=f"BatchNormalization statistics ({report.mode} mode)")
    table.add_column("BN", overflow="fold")
    table.add_column("level", justify="right")
    table.add_column("values / channel", justify="right")
    table.add_column("max mean shift (new std)", justify="right")
    table.add_column("max variance ratio", justify="right")
    for b in report.batchnorms:
        table.add_row(b.bn, str(b.level), f"{b.values_per_channel:,}", fmt(b.mean_shift), fmt(b.variance_ratio))
    for s in report.skipped:
        table.add_row(s.bn, "[yellow]skipped[/yellow]", "", s.reason, "")
    if report.batchnorms or report.skipped:
        console.print(table)
    console.print(f"{len(report.batchnorms)} BN recalibrated on {report.samples:,} samples: "
                  f"{report.levels} level(s), {report.passes} pass(es) over {report.batches} batches, "
                  f"{report.seconds:.2f} s")


def _print_summary(outcome) -> None:
    """The table of a `RecalibrationResult`, read from its typed fields."""
    from rich.console import Console

    console = Console()
    print_recalibration(console, outcome.recalibration)
    if outcome.reload_error:
        console.print(f"[red]{outcome.reload_error}; nothing written[/red]")
        return
    check = outcome.file_check
    console.print(f"the saved file, reloaded: statistics {verdict(bool(outcome.statistics_equal))}, "
                  f"outputs vs the recalibrated model max rel err {fmt(check.max_rel_err)}: "
                  f"{verdict(check.passed)}")
    console.print(f"wrote {outcome.output}" if outcome.output else "[red]check failed; nothing written[/red]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: _work(args), debug=args.debug, show_progress=not args.json,
               json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
