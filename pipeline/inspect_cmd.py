"""`optg inspect MODEL.onnx [--pattern N:M] [--json]`: what sparsity an ONNX file really holds.

Works on any ONNX file: every constant weight of a Conv/Gemm/MatMul is read back, its N:M pattern
checked along the reduction axis in the ONNX layout, and its TensorRT/apex eligibility reported.
Without --pattern it only reports (2:4 compliance and the best-fitting pattern per weight) and
exits 0. With --pattern every weight that can carry it (C % M == 0, ungrouped) must hold it -
including layers left dense, which is what the check is for - else exit 3 naming each offender.
Exit 2 for a missing/unreadable file or a bad pattern (message on stderr).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from optg.nm import parse_nm
from stages.onnx_sparsity import OnnxWeight, collect_weights, load_model, weight_report

from pipeline.exit_codes import EXIT_GATE, EXIT_OK, EXIT_USAGE


def run_inspect(path: str, pattern: str | None, as_json: bool, out: TextIO) -> int:
    """Print the report to `out`; return 0, 3 (a required weight misses the pattern) or 2."""
    nm: tuple[int, int] | None = None
    if pattern is not None:
        try:
            nm = parse_nm(pattern)
        except ValueError as exc:
            print(f"optg inspect: bad --pattern: {exc}", file=sys.stderr)
            return EXIT_USAGE
    file = Path(path)
    if not file.is_file():
        print(f"optg inspect: no such file: {path}", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = load_model(file)
        if not model.ir_version and not model.graph.node:  # protobuf parses b"" as an empty model
            raise ValueError("no ONNX model in the file (empty or not a ModelProto)")
        weights = collect_weights(model, base_dir=str(file.parent))
    except Exception as exc:  # noqa: BLE001 - any decode/load error means "unreadable"
        print(f"optg inspect: cannot read {path} as ONNX: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_USAGE

    checked = nm if nm is not None else (2, 4)
    rows = [weight_report(w, checked) for w in weights]
    violations = [_violation(w, r) for w, r in zip(weights, rows)
                  if nm is not None and r["required"] and not r["pattern_ok"]]
    summary = _summary(rows, checked, nm is not None)
    code = EXIT_GATE if violations else EXIT_OK
    if as_json:
        json.dump({"file": str(file), "pattern": pattern, "checked_pattern": f"{checked[0]}:{checked[1]}",
                   "weights": rows, "summary": summary, "violations": violations, "exit_code": code},
                  out, indent=2)
        out.write("\n")
        for line in violations:
            print(f"optg inspect: {line}", file=sys.stderr)
    else:
        _print_table(file, rows, checked, nm is not None, summary, violations, out)
    return code


def _violation(w: OnnxWeight, row: dict) -> str:
    where = f"weight '{w.name}' (node {w.node}, {w.op}, shape {list(w.shape)})"
    if row["pattern_ok"] is None:
        return f"{where}: reduction axis {w.reduction_axis} cannot carry {row['pattern']}"
    state = "is dense and" if row["sparsity"] == 0.0 else "is"
    return (f"{where} {state} not {row['pattern']} along reduction axis {w.reduction_axis}: "
            f"{row['bad_groups']} of {row['groups']} groups have too many nonzeros, first bad group "
            f"at {row['first_bad_group']} ({row['first_bad_group_nnz']} nonzeros)")


def _summary(rows: list[dict], nm: tuple[int, int], enforced: bool) -> dict:
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
        "trt_eligible": sum(1 for r in rows if r["eligible"]),
        "likely_faster": sum(1 for r in rows if r["likely_faster"]),
        "apex_eligible": sum(1 for r in rows if r["apex_eligible"]),
        "total_params": sum(_numel(r["shape"]) for r in rows),
        "zero_fraction": _weighted_sparsity(rows),
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _weighted_sparsity(rows: list[dict]) -> float:
    total = sum(_numel(r["shape"]) for r in rows)
    zeros = sum(_numel(r["shape"]) * r["sparsity"] for r in rows)
    return round(zeros / total, 6) if total else 0.0


def _print_table(file: Path, rows: list[dict], nm: tuple[int, int], enforced: bool, summary: dict,
                 violations: list[str], out: TextIO) -> None:
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
    print(f"{file}: {len(rows)} Conv/Gemm/MatMul weight(s), {mode}", file=out)
    if not rows:
        print("no constant Conv/Gemm/MatMul weights found", file=out)
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)
    s = summary
    print(f"summary: {s['required']} weight(s) can carry {pat} (C % {nm[1]} == 0, ungrouped): "
          f"{s['holding']} hold it, {s['violating']} do not; {s['exempt']} exempt; TensorRT eligible "
          f"{s['trt_eligible']}, likely faster {s['likely_faster']}, apex ASP {s['apex_eligible']}; "
          f"{100 * s['zero_fraction']:.1f}% of {s['total_params']} weights are zero", file=out)
    for line in violations:
        print(f"FAIL {line}", file=out)
    if enforced:
        print("result: " + (f"FAIL ({len(violations)} weight(s) miss {pat})" if violations
                            else f"OK (every eligible weight holds {pat})"), file=out)
