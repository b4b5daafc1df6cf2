"""bn-fold: fold trained BatchNormalization into conv/dense weights, verified."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keras_bn_ext.cli._common import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_VERIFY_FAILED,
    Phases,
    add_common_arguments,
    fmt,
    run,
)

PROG = "bn-fold"
# Folding reorders float32 arithmetic (x*(W*s) instead of (x*W)*s): errors of a few
# ulp, ~1e-7 of the output's magnitude per layer, growing with depth to ~1e-6 on
# ResNet50-sized models. 1e-5 relative leaves margin and still catches a wrong fold,
# which errs by O(1).
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5
# Images per verification batch. A wrong fold shows on any input (it is a wrong weight,
# not a rare value), so small batches prove as much as large ones; on ResNet50 at
# 224x224 batches of 8 took 4.2 s of an 11.5 s run, batches of 2 take ~1 s.
VERIFY_BATCH = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fold trained BatchNormalization layers into the neighbouring "
        "conv/dense layers of a .keras model and verify the folded model gives the same "
        "inference outputs.",
        epilog=EXIT_CODES_HELP,
    )
    add_common_arguments(
        parser,
        atol=DEFAULT_ATOL,
        rtol=DEFAULT_RTOL,
        samples_help=f"seeded random batches of {VERIFY_BATCH} to verify on (default: 3)",
    )
    parser.add_argument("-o", "--output", help="output .keras file (default: MODEL.folded.keras beside the input)")
    return parser


def default_output(model_path: str) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}.folded.keras")


def _work(args) -> int:
    from keras_bn_ext.compare import compare_models
    from keras_bn_ext.fold import fold_batchnorms
    from keras_bn_ext.model_io import (
        check_model_file,
        check_output_path,
        import_custom_modules,
        load_model,
        save_model_atomic,
    )

    phase = Phases()
    output = Path(args.output) if args.output else default_output(args.model)
    check_model_file(args.model)  # the input's own errors come first
    check_output_path(output, inputs=[args.model], force=args.force)
    import_custom_modules(args.custom_module)
    with phase("load"):
        model = load_model(args.model, safe_mode=not args.unsafe)
    with phase("fold"):
        folded, report = fold_batchnorms(model)
    with phase("verify"):
        comparison = compare_models(
            model, folded, samples=args.samples, batch_size=VERIFY_BATCH, atol=args.atol, rtol=args.rtol
        )
    written = report.bn_folded > 0 and comparison.passed
    if written:
        with phase("save"):
            save_model_atomic(folded, output)
    result = {
        "input": str(args.model),
        "output": str(output) if written else None,
        **report.to_dict(),
        "max_abs_err": comparison.max_abs_err,
        "max_rel_err": comparison.max_rel_err,
        "atol": args.atol,
        "rtol": args.rtol,
        "samples": args.samples,
        "passed": comparison.passed,
        "verification": comparison.to_dict(),
        "timings_s": phase.seconds,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result, report, comparison)
    return EXIT_OK if comparison.passed else EXIT_VERIFY_FAILED


def _print_summary(result, report, comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"BatchNormalization in {result['input']}")
    table.add_column("BN")
    table.add_column("folded into")
    table.add_column("direction / reason")
    for f in report.folded:
        table.add_row(f.bn, f.into, f.direction)
    for k in report.kept:
        table.add_row(k.bn, "[yellow]kept[/yellow]", k.reason)
    if report.bn_total:
        console.print(table)
    console.print(
        f"BN layers: {report.bn_total} -> {report.bn_total - report.bn_folded} "
        f"({report.bn_folded} folded); parameters: {report.params_before:,} -> {report.params_after:,}"
    )
    verdict = "[green]passed[/green]" if comparison.passed else "[red]FAILED[/red]"
    console.print(
        f"verification on {comparison.batches} random batches: max abs err "
        f"{fmt(comparison.max_abs_err)}, max rel err {fmt(comparison.max_rel_err)} "
        f"(atol {fmt(comparison.atol)}, rtol {fmt(comparison.rtol)}): {verdict}"
    )
    if result["output"]:
        console.print(f"wrote {result['output']}")
    elif report.bn_folded == 0:
        console.print("nothing to fold; nothing written")
    else:
        console.print("[red]verification failed; nothing written[/red]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: _work(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
