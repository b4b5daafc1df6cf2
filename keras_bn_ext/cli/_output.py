"""What the tools print: the tables and lines every target shares, and the JSON report."""

from __future__ import annotations

from keras_bn_ext.cli._run import EXIT_OK, EXIT_VERIFY_FAILED


def finish_int8(args, result, seconds: dict, *, what: str, lines=None) -> int:
    """Report an `export.int8.Int8Result` (JSON, or `print_int8`'s table with the target's own
    `lines(console, result)` first) and give the exit code."""
    import json

    result.timings_s = {**seconds, **result.timings_s}
    report = {"input": str(args.model), "calibration_file": args.int8, "eval_file": args.eval_data,
              "int8": result.to_dict(), "passed": result.passed}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_int8(result, what=what, lines=lines)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def print_int8(r, *, what: str, lines=None) -> None:
    """The summary of an INT8 result, read from its typed fields, the same for every target."""
    from rich.console import Console

    console = Console()
    learned = r.calibration.learned
    console.print("a quantization-aware model: its BNs were fused in training, its ranges learned" if learned else
                  f"folded {r.fold.bn_folded} of {r.fold.bn_total} BatchNormalization layers")
    print_equalization(console, r.equalization, r.equalization_max_rel_err)
    if lines is not None:
        lines(console, r)
    cal, ev = r.calibration, r.evaluation
    calibrated = (f"ranges {cal.method}, no calibration" if cal.learned else
                  f"calibrated with {cal.method} on {cal.samples} samples ({cal.batches} batches of {cal.batch_size})")
    console.print(f"{calibrated}; evaluated on {ev.samples} samples ({ev.source}) on {r.runtime} {r.runtime_version}")
    for s in r.fallback:
        if s.action == "keep_in_float_for_latency":
            done = f"kept {'+'.join(s.op_types)} '{s.nodes[0]}' in float for speed"
        elif s.action == "keep_in_float":
            done = f"kept {'+'.join(s.op_types)} '{s.nodes[0]}' in float (it lost {s.added_db:.1f} dB)"
        else:
            done = {"equalize": "tried equalization", "without_equalization": "tried without equalization"}[s.action]
        console.print(f"  fallback: {done}: {'passes' if s.passed else 'still short'}")
    console.print(fidelity_table(r.fidelity, reference="the QAT Keras model (its simulation)" if learned else
                                 "the float Keras model"))
    size = r.size
    console.print(f"wrote {r.path}: {size.int8_bytes:,} bytes ({size.ratio:.2f}x the float {size.float_bytes:,}); "
                  + (f"the float twin (no activation quantization) vs the QAT model {fmt(r.float_max_rel_err)} relative"
                     if learned else f"the float {what} file vs Keras on the same data {fmt(r.float_max_rel_err)} relative"))
    if r.kept_in_float:
        console.print(f"kept in float: {', '.join(r.kept_in_float)}")
    lat = r.latency
    if lat is not None:
        slower = (" [yellow]INT8 is slower than float here: it does not pay on this machine's runtime[/yellow]"
                  if lat.int8_slower else "")
        console.print(f"{r.runtime} on {lat.device}, batch {lat.batch}: float {lat.float_ms:.3f} ms, INT8 "
                      f"{lat.int8_ms:.3f} ms ({lat.ratio:.2f}x){slower}")
        if lat.costly_nodes:
            console.print("  costliest quantized nodes (with their Q/DQ): " + ", ".join(
                f"{n['op']} '{n['node']}' {n['ms']:.3f} ms ({n['qdq_ms']:.3f} in Q/DQ)" for n in lat.costly_nodes)
                + "; --latency-first keeps them in float while that is faster")
    if not r.passed:
        console.print(f"[red]INT8 criteria missed; {r.path} is kept for inspection[/red]")


def print_export(result, *, what: str) -> None:
    """The summary of a float `export.driver.ExportResult`, read from its typed fields, the same
    for every target (`what`: the file's kind, "OpenVINO")."""
    from rich.console import Console

    console = Console()
    e, v = result.export, result.verification
    if e.fold is not None:
        console.print(f"folded {e.fold.bn_folded} of {e.fold.bn_total} BatchNormalization layers"
                      + (f" ({len(e.fold.kept)} kept: see bn-fold for reasons)" if e.fold.kept else ""))
    ops = ", ".join(f"{k} {n}" for k, n in e.op_counts.items())
    names = ", ".join(i["name"] for i in e.inputs)
    written = ", ".join([e.path, *e.companions])
    console.print(f"wrote {written} ({e.precision}; {names} -> {', '.join(e.output_names)}; {ops})")
    console.print(output_table(f"{what} outputs vs Keras outputs ({v.runtime} {v.runtime_version} on {v.device}, "
                               f"batch sizes {v.batch_sizes})", v.comparison.outputs))
    if v.exact:
        console.print("above tolerance in float32; " + exact_line(v.exact, original="Keras", candidate=what,
                                                                   what="the export"))
    if v.latency_ms:
        console.print("median latency (ms): " + ", ".join(f"batch {b}: {ms:.3f}" for b, ms in v.latency_ms.items()))
    if not result.passed:
        console.print(f"[red]verification failed; {e.path} is kept for inspection[/red]")


def output_table(title: str, outputs):
    """A rich table of per-output errors (`compare.OutputError`s), the same for every target."""
    from rich.table import Table

    table = Table(title=title)
    # NaN/inf: shown when any output has some, in the reference or the candidate.
    special = any(o.nonfinite_mismatches or o.reference_nonfinite for o in outputs)
    columns = ("output", "max abs err", "max rel err", "mean abs err") + (("NaN/inf mismatches",) if special else ())
    for column in columns + ("result",):
        table.add_column(column)
    for o in outputs:
        cells = [o.name, fmt(o.max_abs_err), fmt(o.max_rel_err), fmt(o.mean_abs_err)]
        if special:
            cells.append(f"{o.nonfinite_mismatches:,} (reference has {o.reference_nonfinite:,})")
        table.add_row(*cells, verdict(o.passed))
    return table


def exact_line(exact, *, original: str, candidate: str, what: str) -> str:
    """The float64 judgement (`compare.ExactArithmeticCheck`) in one line, the same for every
    tool: whether its float64 reference could judge at all, then the verdict."""
    if not exact.reference_valid:
        return (f"float64 judgement not applied ({exact.reference_code}): {exact.reference_reason}; "
                f"{exact.reference_detail or ''} — the float32 verdict stands: {verdict(False)}")
    bad = (f", {exact.candidate_nonfinite_mismatches:,} NaN/inf where the reference has none"
           if exact.candidate_nonfinite_mismatches else "")
    return (f"against the model in float64 (exact arithmetic, its twin checked layer by layer): {original} "
            f"{fmt(exact.original_max_rel_err)}, {candidate} {fmt(exact.candidate_max_rel_err)} relative{bad} — "
            f"{what} adds no error beyond float32 rounding: {verdict(exact.passed)}")


def fidelity_table(fidelity, *, reference: str = "the float Keras model"):
    """A rich table of an INT8 file's `FidelityReport` against its reference (the float Keras
    model; a QAT model's simulation), the same for every target."""
    from rich.table import Table

    table = Table(title=f"INT8 vs {reference} ({fidelity.samples} samples)")
    for column in ("output", "SQNR dB", "max rel err", "mean rel err", "top-1 agreement", "accuracy float -> INT8",
                   "result"):
        table.add_column(column)
    for o in fidelity.outputs:
        acc = (f"{o.accuracy_float:.4f} -> {o.accuracy_quantized:.4f} ({-o.accuracy_drop_pt:+.2f} pt)"
               if o.accuracy_float is not None else "-")
        agree = f"{o.top1_agreement:.4f}" if o.top1_agreement is not None else "-"
        table.add_row(o.name, f"{o.sqnr_db:.1f}", fmt(o.max_rel_err), fmt(o.mean_rel_err), agree, acc,
                      verdict(o.passed, "FAILED: " + ", ".join(o.failed)))
    return table


def print_equalization(console, report, max_rel_err) -> None:
    """What cross-layer equalization did (an `EqualizationReport`; None: not applied)."""
    if report is None:
        return
    exact = f"; verified exact to {fmt(max_rel_err)} relative" if max_rel_err is not None else ""
    console.print(f"cross-layer equalization: {len(report.pairs)} pairs ({report.sweeps} sweeps), "
                  f"{len(report.skipped)} left alone{exact}")
    for s in report.skipped:
        console.print(f"  left alone [{s.code}]: {s.reason}")
    if report.relu6_replaced:
        console.print(f"  [yellow]ReLU6 replaced by ReLU (the function changed): "
                      f"{', '.join(report.relu6_replaced)}[/yellow]")


def verdict(passed: bool, failed: str = "FAILED") -> str:
    """A check's result, coloured for rich."""
    return "[green]passed[/green]" if passed else f"[red]{failed}[/red]"


def fmt(value: float) -> str:
    return f"{value:.3g}"
