"""`optg inspect MODEL.onnx [--pattern N:M] [--json]`: what sparsity an ONNX file really holds.

Works on any ONNX file: every weight of a Conv/Gemm/MatMul (and their com.microsoft and integer
forms) is read back through the ops between it and its storage (QDQ, Transpose, Reshape, Cast...;
see `stages.onnx_sparsity`), its N:M pattern checked along the reduction axis in the consumer's
layout, and its TensorRT/apex eligibility reported. A weight input that cannot be traced to an
initializer or Constant is reported as untraced.

Without --pattern it only reports and exits 0. With --pattern it fails closed (exit 3): every
weight that can carry the pattern (C % M == 0, ungrouped) must hold it - including layers left
dense - every weight input must have been traced, and at least one weight must have been checked
("0 weights checked" is never OK). Exit 2 for a missing/unreadable file, a tensor too large to
read (a sparse initializer declaring more than MAX_DENSE_ELEMENTS when it must be densified) or a
bad pattern (message on stderr).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from optg import Pattern
from pipeline.exit_codes import EXIT_GATE, EXIT_OK, EXIT_USAGE
from stages.onnx_sparsity import (
    OnnxWeight,
    OversizedTensor,
    WeightScan,
    dense_exemptions,
    load_model,
    pattern_coverage,
    scan_weights,
    weight_macs,
    weight_report,
)


def run_inspect(path: str, pattern: str | None, as_json: bool, out: TextIO) -> int:
    """Print the report to `out`; return 0, 3 (a weight misses the pattern, a weight input could
    not be traced, or nothing could be checked - only with `pattern`) or 2."""
    nm: tuple[int, int] | None = None
    if pattern is not None:
        try:
            parsed = Pattern.parse(pattern)
            if not parsed.is_nm:
                raise ValueError(f"inspect checks an N:M pattern such as '2:4', got {pattern!r}")
        except (TypeError, ValueError) as exc:
            print(f"optg inspect: bad --pattern: {exc}", file=sys.stderr)
            return EXIT_USAGE
        nm = (parsed.n, parsed.m)
    file = Path(path)
    if not file.is_file():
        print(f"optg inspect: no such file: {path}", file=sys.stderr)
        return EXIT_USAGE
    checked = nm if nm is not None else (2, 4)
    try:
        model = load_model(file)
        if not model.ir_version and not model.graph.node:  # protobuf parses b"" as an empty model
            raise ValueError("no ONNX model in the file (empty or not a ModelProto)")
        scan = scan_weights(model, base_dir=str(file.parent))
        exempt = dense_exemptions(model)
        rows = [weight_report(w, checked, exempt) for w in scan.weights]
        for row, macs in zip(rows, weight_macs(model, scan.weights)):
            row["macs"] = macs
    except OversizedTensor as exc:
        print(f"optg inspect: cannot read {path}: oversized tensor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - any decode/load error means "unreadable"
        print(f"optg inspect: cannot read {path} as ONNX: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_USAGE

    enforced = nm is not None
    violations = [_violation(w, r) for w, r in zip(scan.weights, rows)
                  if enforced and r["required"] and not r["pattern_ok"]]
    untraced = [u.describe() for u in scan.untraced]
    summary = _summary(rows, scan, checked, enforced)
    failures = violations + (untraced if enforced else [])
    if enforced and summary["required"] == 0:
        failures.append(_nothing_checked(rows, checked))
    code = EXIT_GATE if failures else EXIT_OK
    if as_json:
        json.dump({"file": str(file), "pattern": pattern,
                   "checked_pattern": f"{checked[0]}:{checked[1]}", "weights": rows,
                   "untraced": [vars(u) for u in scan.untraced],
                   "not_inspected": scan.not_inspected, "summary": summary,
                   "violations": violations, "failures": failures, "exit_code": code},
                  out, indent=2)
        out.write("\n")
        for line in failures:
            print(f"optg inspect: {line}", file=sys.stderr)
    else:
        _print_table(file, rows, scan, checked, enforced, summary, failures, out)
    return code


def _violation(w: OnnxWeight, row: dict) -> str:
    where = f"weight '{w.name}' (node {w.node}, {w.op}, shape {list(w.shape)})"
    if row["pattern_ok"] is None:
        return f"{where}: reduction axis {w.reduction_axis} cannot carry {row['pattern']}"
    state = "is dense and" if row["sparsity"] == 0.0 else "is"
    return (f"{where} {state} not {row['pattern']} along reduction axis {w.reduction_axis}: "
            f"{row['bad_groups']} of {row['groups']} groups have too many nonzeros, first bad group "
            f"at {row['first_bad_group']} ({row['first_bad_group_nnz']} nonzeros)")


def _nothing_checked(rows: list[dict], nm: tuple[int, int]) -> str:
    pat = f"{nm[0]}:{nm[1]}"
    if not rows:
        return f"nothing checked: no Conv/Gemm/MatMul weight could be read, so {pat} is unproven"
    exempt = ", ".join(f"'{r['name']}' ({r['exempt_reason']})" for r in rows)
    return f"nothing checked: no weight can carry {pat}; every weight is exempt: {exempt}"


def _summary(rows: list[dict], scan: WeightScan, nm: tuple[int, int], enforced: bool) -> dict:
    pat = f"{nm[0]}:{nm[1]}"
    required = [r for r in rows if r["required"]]
    return {
        "weights": len(rows),
        "pattern": pat,
        "enforced": enforced,
        "required": len(required),
        "holding": sum(1 for r in required if r["pattern_ok"]),
        "violating": sum(1 for r in required if not r["pattern_ok"]),
        "exempt": len(rows) - len(required),
        "untraced": len(scan.untraced),
        "not_inspected": len(scan.not_inspected),
        "activation_operands": scan.activation_operands,
        "trt_eligible": sum(1 for r in rows if r["eligible"]),
        "likely_faster": sum(1 for r in rows if r["likely_faster"]),
        "apex_eligible": sum(1 for r in rows if r["apex_eligible"]),
        "total_params": sum(r["numel"] for r in rows),
        "zero_fraction": _weighted_sparsity(rows),
        # the share of Conv/Gemm/MatMul weight MACs on weights holding the pattern
        "pattern_coverage": pattern_coverage([r["macs"] for r in rows], [bool(r["pattern_ok"]) for r in rows]),
    }


def _weighted_sparsity(rows: list[dict]) -> float:
    """Zeros over all weights, from each weight's exact zero count (not its rounded fraction)."""
    total = sum(r["numel"] for r in rows)
    return round(sum(r["zeros"] for r in rows) / total, 6) if total else 0.0


def _print_table(file: Path, rows: list[dict], scan: WeightScan, nm: tuple[int, int],
                 enforced: bool, summary: dict, failures: list[str], out: TextIO) -> None:
    pat = f"{nm[0]}:{nm[1]}"
    head = ["weight", "node", "op", "shape", "axis", "sparsity", pat, "best fit", "TRT", "reason"]
    table = [head]
    for r in rows:
        if not r["required"]:
            status = f"exempt ({r['exempt_reason']})"
        else:
            status = "ok" if r["pattern_ok"] else ("FAIL" if enforced else "no")
        table.append([
            r["name"], r["node"], r["op"], "x".join(str(d) for d in r["shape"]),
            str(r["reduction_axis"]), f"{100 * r['sparsity']:.1f}%", status, r["best_pattern"] or "-",
            "fast" if r["likely_faster"] else ("yes" if r["eligible"] else "no"), r["reason"] or "-",
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    mode = f"enforcing {pat}" if enforced else f"report only, {pat} shown"
    print(f"{file}: {len(rows)} Conv/Gemm/MatMul weight(s) read, {len(scan.untraced)} untraced, "
          f"{mode}", file=out)
    if not rows:
        print("no Conv/Gemm/MatMul weights could be read", file=out)
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)
    if not enforced:
        for u in scan.untraced:
            print(f"untraced: {u.describe()}", file=out)
    for note in scan.not_inspected:
        print(f"not inspected: {note}", file=out)
    s = summary
    print(f"summary: {s['required']} weight(s) can carry {pat} (C % {nm[1]} == 0, ungrouped): "
          f"{s['holding']} hold it, {s['violating']} do not; {s['exempt']} exempt; {s['untraced']} "
          f"untraced; TensorRT eligible {s['trt_eligible']}, likely faster {s['likely_faster']}, "
          f"apex ASP {s['apex_eligible']}; {100 * s['zero_fraction']:.1f}% of {s['total_params']} "
          f"weights are zero", file=out)
    if s["pattern_coverage"] is not None:
        print(f"{pat} coverage: {100 * s['pattern_coverage']:.1f}% of Conv/Gemm/MatMul weight MACs run on weights "
              f"holding {pat}", file=out)
    for line in failures:
        print(f"FAIL {line}", file=out)
    if enforced:
        print("result: " + (f"FAIL ({len(failures)} problem(s): weights that miss {pat}, cannot be "
                            f"traced, or nothing checked)" if failures
                            else f"OK ({s['required']} weight(s) checked, every eligible weight holds "
                                 f"{pat})"), file=out)
