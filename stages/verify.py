"""Verify stage: the written ONNX file is valid, computes what PyTorch computes, and keeps the sparsity.

All checks run and every failure is collected (a release gate should list everything wrong at
once). Failures are strings prefixed with their gate, "onnx_parity: ..." or "nm_pattern: ...", and
name the output, ONNX tensor, consuming node and PyTorch weight concerned.

Default tolerances: fp32 atol 1e-4 / rtol 1e-3; fp16 atol 1e-2 / rtol 1e-2 (half precision weights
and activations against the fp32 PyTorch reference). An element passes when
|onnx - torch| <= atol + rtol * |torch| (numpy.allclose semantics).

The export -> verify contract: `verify_onnx` takes the `ExportResult` that `stages.export` returned
(file paths, compact sibling, weight dtype, graph input/output names) and checks the files against
it; it never guesses a file name.

PyTorch weights are found in the file by name first, then by the dynamo exporter's node metadata
(the "%p_<param>" reference and module path of the consuming node, which survive the renaming of a
Linear-on-3-D weight to "val_N"), then by node order among the remaining weights of the same
(PyTorch-layout) shape. See stages/export.py for what the exporter does to names and BatchNorm.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from optg.pattern import Pattern
from stages import weight_match
from stages.base import GateFailure, StageError, StrictModel, eval_mode
from stages.context import RunContext, Stage
from stages.export import ExportResult, convert_float_type
from stages.onnx_sparsity import (
    OnnxWeight,
    check_nm,
    collect_weights,
    dense_exemptions,
    load_model,
    must_hold,
    pattern_coverage,
    weight_macs,
    weight_report,
)
from stages.tasks import export_view

DEFAULT_TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 1e-2)}  # (atol, rtol)
PARITY, PATTERN = "onnx_parity", "nm_pattern"
_NO_KERNEL = ("NOT_IMPLEMENTED", "Could not find an implementation")


class VerifyConfig(StrictModel):
    """What the verify stage checks and how strictly."""

    enabled: bool = True
    """check model.onnx against PyTorch and read its pattern back"""
    atol: float | None = Field(default=None, ge=0)  # None: 1e-4 for fp32, 1e-2 for fp16
    """parity tolerance; null: 1e-4 for fp32, 1e-2 for fp16"""
    rtol: float | None = Field(default=None, ge=0)  # None: 1e-3 for fp32, 1e-2 for fp16
    """parity tolerance; null: 1e-3 for fp32, 1e-2 for fp16"""
    num_samples: int = Field(default=256, ge=1)
    """validation inputs compared against PyTorch"""
    check_pattern: bool = True
    """read every weight back from the file and check its pattern"""
    sparsity_tolerance: float = Field(default=0.001, ge=0, le=1)
    """how far a weight's sparsity may fall short of its target"""

    def tolerances(self, dtype: str) -> tuple[float, float]:
        atol, rtol = DEFAULT_TOLERANCES[dtype]
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)


@dataclass
class LayerExpectation:
    """What PyTorch says about one baked weight."""

    torch_name: str
    pattern: Pattern  # the baked layer's own (`BakedLayer.pattern`): N:M, unstructured or dense
    sparsity: float

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"LayerExpectation({self.torch_name!r}): pattern must be an optg Pattern, "
                            f"got {self.pattern!r} (parse text once with Pattern.parse)")


class VerifyResult(BaseModel):
    """Every failure (prefixed by its gate), the per-output parity rows, one read-back row per ONNX
    weight (the keys of `stages.onnx_sparsity.weight_report` plus the PyTorch match), and notes.
    Rows hold JSON values only (non-finite floats as text)."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    failures: list[str]
    outputs: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    notes: list[str] = Field(default_factory=list)
    # the share of the file's Conv/Gemm/MatMul weight MACs on weights holding the run's N:M
    # pattern (None for an unstructured run or a file without weight MACs)
    pattern_coverage: float | None = None
    # export.quantize int8: per weighted GEMM of model.int8.onnx, its Q/DQ placement
    # (`stages.quantize.QdqLayer.to_dict`) and the N:M read back through DequantizeLinear
    quantized: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def of(cls, failures: list[str], outputs: list[dict], layers: list[dict], notes: list[str]) -> "VerifyResult":
        return cls(passed=not failures, failures=failures, outputs=_jsonable(outputs), layers=_jsonable(layers),
                   notes=notes)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @property
    def parity_max_abs_error(self) -> float | None:
        """The largest output error of the dense file, None when no output was compared."""
        errors = [o["max_abs_err"] for o in self.outputs if isinstance(o.get("max_abs_err"), (int, float))]
        return max(errors) if errors else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def raise_on_failure(result: VerifyResult) -> None:
    """GateFailure listing every failure; the gate is onnx_parity if any parity check failed."""
    if result.passed:
        return
    gate = PARITY if any(f.startswith(PARITY) for f in result.failures) else PATTERN
    raise GateFailure(gate, f"ONNX verification failed ({len(result.failures)} problem(s)):\n- "
                      + "\n- ".join(result.failures))


Feed = list[torch.Tensor]  # one set of model inputs, in the order of the file's graph inputs


def as_feeds(inputs: torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]]) -> list[Feed]:
    """One tensor (one single-input feed), one feed (a list of tensors) or a list of feeds."""
    if isinstance(inputs, torch.Tensor):
        return [[inputs]]
    items = list(inputs)
    if items and all(isinstance(t, torch.Tensor) for t in items):
        return [list(items)]  # type: ignore[arg-type]
    return [list(feed) for feed in items]  # type: ignore[arg-type]


def verify_onnx(export: ExportResult, model: nn.Module,
                inputs: torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
                expectations: list[LayerExpectation], cfg: VerifyConfig) -> VerifyResult:
    """Check the files `export` wrote against `model` (called with a feed's tensors
    positionally: `stages.tasks.export_view` for a task's model) on the first
    `cfg.num_samples` samples of each feed. A feed is the file's inputs in graph order; text
    models are checked on two feeds of different sequence lengths."""
    path, dtype = Path(export.path), export.dtype
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(f"dtype must be one of {sorted(DEFAULT_TOLERANCES)}, got {dtype!r}")
    failures: list[str] = []
    notes: list[str] = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker raises several exception types
        failures.append(f"{PARITY}: onnx.checker rejects {path.name}: {_short(exc)}")
    try:
        proto = load_model(path)
    except Exception as exc:  # noqa: BLE001
        failures.append(f"{PARITY}: cannot load {path}: {_short(exc)}")
        return VerifyResult.of(failures, [], [], notes)
    failures += [f"{PARITY}: {f}" for f in _interface_failures(proto, export)]

    atol, rtol = cfg.tolerances(dtype)
    weights = collect_weights(proto, base_dir=str(path.parent))
    # map every PyTorch weight (not only the expected ones) so the layer table names them all
    extra = [n for n, p in model.named_parameters() if p.dim() >= 2]
    matches = match_weights(expectations, weights, model, also=extra)
    layers = _layer_reports(weights, matches, expectations, model, dtype, cfg.sparsity_tolerance)

    feeds = [[t[: cfg.num_samples].detach() for t in feed] for feed in as_feeds(inputs)]
    outputs, parity_fail, onnx_outs = [], [], []
    for index, feed in enumerate(feeds):
        rows, fails, got = _parity(path, proto, model, feed, atol, rtol, dtype, notes)
        if len(feeds) > 1:
            shape = list(feed[0].shape)
            rows = [{**row, "feed": index, "input_shape": shape} for row in rows]
            fails = [f"inputs of shape {shape}: {f}" for f in fails]
        outputs += rows
        parity_fail += fails
        onnx_outs.append(got)
    if parity_fail:
        suspects = [f"'{d['name']}' (node {d['node']}, torch {d['torch_name']}: {d['value_check']})"
                    for d in layers if d.get("value_check") == "differs"
                    or (d.get("value_check") == "rescaled" and d["op"] != "Conv")]
        if suspects:
            parity_fail = [f + "; weights not equal to PyTorch: " + ", ".join(suspects)
                           for f in parity_fail]
    failures += [f"{PARITY}: {f}" for f in parity_fail]

    compact = export.compact_path
    if compact is not None and not Path(compact).is_file():
        failures.append(f"{PARITY}: compact file {compact} reported by export is missing")
    elif compact is not None and onnx_outs[0] is not None:
        failures += [f"{PARITY}: {f}" for f in _compact_parity(Path(compact), feeds[0], onnx_outs[0], atol, rtol,
                                                                 notes)]

    if cfg.check_pattern:
        failures += [f"{PATTERN}: {f}" for f in _pattern_failures(
            expectations, matches, model, path.name, cfg.sparsity_tolerance, notes)]
        failures += [f"{PATTERN}: {f}" for f in _inspect_failures(proto, weights, matches, path.name)]
    result = VerifyResult.of(failures, outputs, layers, notes)
    result.pattern_coverage = coverage(proto, weights)
    return result


def verify_int8(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The INT8 QDQ file's checks: inspect's N:M rule on the weights read back through
    DequantizeLinear (zero point 0 keeps zeros zero), and every weighted GEMM that must hold the
    pattern in the INT8-in, INT8-weight, INT8-out form TensorRT's sparse INT8 kernels need.
    Returns (failures prefixed by their gate, one row per weighted GEMM)."""
    from stages.quantize import qdq_placement

    proto = load_model(path)
    weights = collect_weights(proto, base_dir=str(path.parent))
    failures = [f"{PATTERN}: {f}" for f in _inspect_failures(proto, weights, {}, path.name)]
    nm = _file_nm(proto)
    exempt = dense_exemptions(proto)
    by_node = {w.node: w for w in weights if w.input_index == 1}
    rows = []
    for layer in qdq_placement(proto):
        row = layer.to_dict()
        w = by_node.get(layer.node)
        required = w is not None and nm is not None and must_hold(w, nm[1], exempt)[0]
        row["pattern_ok"] = None if w is None or nm is None else w.check(*nm).holds
        row["required"] = required
        rows.append(row)
        if required and not layer.sparse_int8_form:
            missing = [what for what, ok in (("INT8 in", layer.int8_in), ("INT8 weight with zero point 0",
                                             layer.int8_weight), ("INT8 out", layer.int8_out)) if not ok]
            failures.append(f"{PATTERN}: {path.name}: {layer.op} node {layer.node} (weight '{layer.weight}') is not "
                            f"{', '.join(missing)}: TensorRT would run it with dense kernels")
    return failures, rows


def coverage(proto: onnx.ModelProto, weights: list[OnnxWeight]) -> float | None:
    """`optg inspect`'s coverage for the file's own N:M pattern (metadata `optg.pattern`)."""
    nm = _file_nm(proto)
    if nm is None:
        return None
    return pattern_coverage(weight_macs(proto, weights), [w.check(*nm).holds for w in weights])


def _inspect_failures(proto: onnx.ModelProto, weights: list[OnnxWeight],
                      matches: dict[str, tuple[OnnxWeight, str]], file: str) -> list[str]:
    """`optg inspect --pattern N:M`'s rule on the file, for the run's N:M pattern (metadata
    `optg.pattern`): every weight that can carry it holds it unless the file records it as
    left dense on purpose. What verify accepts, inspect accepts too."""
    nm = _file_nm(proto)
    if nm is None:
        return []
    exempt = dense_exemptions(proto)
    torch_of = {id(w): name for name, (w, _) in matches.items()}
    out = []
    for w in weights:
        required, _ = must_hold(w, nm[1], exempt)
        if required and not w.check(*nm).holds:
            torch_name = torch_of.get(id(w))
            named = f", torch '{torch_name}'" if torch_name else ""
            out.append(f"ONNX tensor '{w.name}' (node {w.node}, {w.op}{named}) can carry {nm[0]}:{nm[1]} and does "
                       f"not hold it, and the run recorded no reason to keep it dense: `optg inspect --pattern "
                       f"{nm[0]}:{nm[1]} {file}` would fail")
    return out


def _interface_failures(proto: onnx.ModelProto, export: ExportResult) -> list[str]:
    """The file's graph inputs and outputs are the ones export reported writing."""
    initializers = {t.name for t in proto.graph.initializer}
    found = {"inputs": [i.name for i in proto.graph.input if i.name not in initializers],
             "outputs": [o.name for o in proto.graph.output]}
    expected = {"inputs": export.input_names, "outputs": export.output_names}
    return [f"{Path(export.path).name} has graph {kind} {found[kind]}, export reported {expected[kind]}"
            for kind in ("inputs", "outputs") if expected[kind] and found[kind] != expected[kind]]


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------- name mapping


def match_weights(expectations: list[LayerExpectation], weights: list[OnnxWeight],
                  model: nn.Module, also: Sequence[str] = ()) -> dict[str, tuple[OnnxWeight, str]]:
    """torch_name -> (ONNX weight, how it was found): `stages.weight_match.match_weights` on the
    expectations' names."""
    return weight_match.match_weights([e.torch_name for e in expectations], weights, model, also)


# ----------------------------------------------------------------------------- per-layer checks


def _layer_reports(weights: list[OnnxWeight], matches: dict[str, tuple[OnnxWeight, str]],
                   expectations: list[LayerExpectation], model: nn.Module, dtype: str,
                   tolerance: float) -> list[dict]:
    """One row per ONNX weight; pattern_ok judges the expected pattern (None when dense/unmapped)."""
    by_weight = {id(w): (name, how) for name, (w, how) in matches.items()}
    expected = {e.torch_name: e for e in expectations}
    params = dict(model.named_parameters())
    reports = []
    for w in weights:
        torch_name, how = by_weight.get(id(w), (None, None))
        exp = expected.get(torch_name) if torch_name else None
        nm = (exp.pattern.n, exp.pattern.m) if exp is not None and exp.pattern.is_nm else None
        rep = weight_report(w, nm)
        rep.update(torch_name=torch_name, match=how, expected_pattern=str(exp.pattern) if exp else None,
                   expected_sparsity=exp.sparsity if exp else None, value_check=None)
        if exp is not None and exp.pattern.kind == "unstructured":
            rep["pattern_ok"] = abs(w.sparsity - exp.sparsity) <= tolerance
        elif nm is None:
            rep["pattern_ok"] = None
        if torch_name in params:
            rep["value_check"] = _value_check(w.torch_layout(), params[torch_name], dtype)
        reports.append(rep)
    return reports


def _file_nm(proto: onnx.ModelProto) -> tuple[int, int] | None:
    """The N:M pattern a file records it was exported for (metadata `optg.pattern`, written by
    the export stage), or None: an unstructured or dense run, or a file from elsewhere, whose
    metadata is only read, never trusted to be well formed."""
    text = {p.key: p.value for p in proto.metadata_props}.get("optg.pattern", "")
    try:
        pattern = Pattern.parse(text)
    except (TypeError, ValueError):
        return None
    return (pattern.n, pattern.m) if pattern.is_nm else None


def _value_check(onnx_w: np.ndarray, torch_w: torch.Tensor, dtype: str) -> str:
    """'exact', 'rescaled' (per output channel, what BatchNorm folding does) or 'differs'."""
    if torch_w.dim() == 2 and tuple(torch_w.shape) != onnx_w.shape and tuple(torch_w.shape[::-1]) == onnx_w.shape:
        torch_w = torch_w.t()  # stored [in, out] (transformers' Conv1D): compare in the [out, in] layout
    a = onnx_w.astype(np.float64).reshape(onnx_w.shape[0], -1)
    if torch_w.numel() != a.size:
        return "differs"
    b = torch_w.detach().double().cpu().numpy().reshape(a.shape[0], -1)
    rtol = 2e-3 if dtype == "fp16" else 1e-6
    atol = rtol * max(float(np.abs(b).max(initial=0.0)), 1e-12)
    if np.allclose(a, b, rtol=rtol, atol=atol):
        return "exact"
    denom = (b * b).sum(axis=1)
    ratio = np.divide((a * b).sum(axis=1), denom, out=np.zeros_like(denom), where=denom > 0)
    scaled = ratio[:, None] * b
    atol = rtol * max(float(np.abs(a).max(initial=0.0)), 1e-12)
    return "rescaled" if np.allclose(a, scaled, rtol=rtol * 10, atol=atol * 10) else "differs"


def _pattern_failures(expectations: list[LayerExpectation], matches: dict[str, tuple[OnnxWeight, str]],
                      model: nn.Module, file: str, tolerance: float, notes: list[str]) -> list[str]:
    shapes = weight_match.torch_shapes(model)
    out: list[str] = []
    for exp in expectations:
        hit = matches.get(exp.torch_name)
        pattern = exp.pattern
        if hit is None:
            text = (f"weight '{exp.torch_name}' ({exp.pattern}, PyTorch shape "
                    f"{list(shapes.get(exp.torch_name, ()))}) not found in {file}: no Conv/Gemm/MatMul "
                    f"constant matches it by name, exporter metadata or node order and shape")
            if pattern.is_dense:
                notes.append(text)
            else:
                out.append(text)
            continue
        w, how = hit
        where = f"ONNX tensor '{w.name}' (node {w.node}, {w.op}, torch '{exp.torch_name}', found by {how})"
        if pattern.is_nm:
            check = check_nm(w.values, w.reduction_axis, pattern.n, pattern.m)
            if not check.applicable:
                out.append(f"{where}: reduction axis {w.reduction_axis} of shape {list(w.shape)} "
                           f"has size {w.reduction_size}, not divisible by {pattern.m}")
            elif not check.holds:
                out.append(f"{where} is not {pattern} along reduction axis {w.reduction_axis} of "
                           f"shape {list(w.shape)}: {check.describe()}")
        elif pattern.kind == "unstructured":
            got = w.sparsity
            if abs(got - exp.sparsity) > tolerance:
                out.append(f"{where}: sparsity {got:.4f} in the file, {exp.sparsity:.4f} expected "
                           f"(tolerance {tolerance})")
    return out


# ----------------------------------------------------------------------------- parity


def _make_session(model: str | bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _torch_outputs(model: nn.Module, inputs: Feed) -> list[tuple[str | None, np.ndarray]]:
    """Reference outputs in fp32, flattened to (name or None, array)."""
    ref = model if all(p.dtype == torch.float32 for p in model.parameters()) \
        else copy.deepcopy(model).float()
    with eval_mode(ref), torch.no_grad():
        result = ref(*[x.float() if x.is_floating_point() else x for x in inputs])
    flat: list[tuple[str | None, np.ndarray]] = []

    def walk(obj: Any, name: str | None) -> None:
        if isinstance(obj, torch.Tensor):
            flat.append((name, obj.detach().double().cpu().numpy()))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, None)

    walk(result, None)
    return flat


_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _run(session: ort.InferenceSession, feed: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run over the feed (arrays in graph-input order), in chunks when the file's batch
    dimension is fixed."""
    metas = session.get_inputs()
    if len(metas) != len(feed):
        raise ValueError(f"the file has {len(metas)} input(s) {[m.name for m in metas]}, the model takes "
                         f"{len(feed)}")
    xs = [x.astype(_ORT_TO_NP.get(m.type, x.dtype)) for m, x in zip(metas, feed)]
    n = xs[0].shape[0]
    batch = metas[0].shape[0] if metas[0].shape else None
    if not isinstance(batch, int) or batch <= 0 or batch == n:
        return session.run(None, {m.name: x for m, x in zip(metas, xs)})
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        parts = [x[start:start + batch] for x in xs]
        short = batch - parts[0].shape[0]
        if short:
            parts = [np.concatenate([part, np.repeat(x[:1], short, axis=0)]) for part, x in zip(parts, xs)]
        res = session.run(None, {m.name: part for m, part in zip(metas, parts)})
        chunks.append([r[: batch - short] for r in res])
    return [np.concatenate(parts) for parts in zip(*chunks)]


def _ort_outputs(path: Path, proto: onnx.ModelProto, x: Sequence[np.ndarray], dtype: str,
                 notes: list[str]) -> tuple[ort.InferenceSession, list[np.ndarray]]:
    """Run the file; fp16 without a CPU kernel reruns with its weights upcast to fp32."""
    try:
        session = _make_session(str(path))
        return session, _run(session, x)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        if dtype != "fp16" or not any(k in str(exc) for k in _NO_KERNEL):
            raise
        upcast = convert_float_type(proto, TensorProto.FLOAT16, TensorProto.FLOAT)
        session = _make_session(upcast.SerializeToString())
        notes.append("fp16 verified with weights upcast to fp32 because ONNX Runtime CPU has no fp16 "
                     f"kernel for part of the graph ({_short(exc, 200)})")
        return session, _run(session, x)


def _compare(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> dict:
    got64 = got.astype(np.float64)
    diff = np.abs(got64 - want)
    if diff.size == 0:
        return {"name": name, "shape": list(got.shape), "max_abs_err": 0.0, "max_rel_err": 0.0,
                "atol": atol, "rtol": rtol, "ok": True, "worst_index": None}
    bad = ~(diff <= atol + rtol * np.abs(want))  # NaN counts as bad
    rel = diff / np.maximum(np.abs(want), atol)
    worst = np.unravel_index(int(np.nanargmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape)
    return {"name": name, "shape": list(got.shape), "max_abs_err": float(np.nanmax(diff)),
            "max_rel_err": float(np.nanmax(rel)), "atol": atol, "rtol": rtol,
            "ok": not bool(bad.any()), "bad_elements": int(bad.sum()),
            "worst_index": [int(i) for i in worst]}


def _parity(path: Path, proto: onnx.ModelProto, model: nn.Module, feed: Feed, atol: float,
            rtol: float, dtype: str, notes: list[str]
            ) -> tuple[list[dict], list[str], list[np.ndarray] | None]:
    fails: list[str] = []
    try:
        reference = _torch_outputs(model, feed)
    except Exception as exc:  # noqa: BLE001
        return [], [f"PyTorch model failed on the verification inputs: {_short(exc)}"], None
    x = [t.cpu().numpy() for t in feed]
    try:
        session, got = _ort_outputs(path, proto, x, dtype, notes)
    except Exception as exc:  # noqa: BLE001
        return [], [f"ONNX Runtime cannot run {path.name}: {_short(exc)}"], None
    names = [o.name for o in session.get_outputs()]
    if len(names) != len(reference):
        fails.append(f"{path.name} has {len(names)} outputs {names}, PyTorch returns {len(reference)}")
    ref_names = [n for n, _ in reference if n is not None]
    if ref_names and len(ref_names) == len(names) and set(ref_names) != set(names):
        fails.append(f"output names {names} differ from PyTorch's {ref_names}")
    declared = {o.name: o.type.tensor_type.shape for o in proto.graph.output}
    outputs: list[dict] = []
    for name, value, (_, want) in zip(names, got, reference):
        if value.shape != want.shape:
            fails.append(f"output '{name}' has shape {list(value.shape)}, PyTorch {list(want.shape)}")
            outputs.append({"name": name, "shape": list(value.shape), "ok": False,
                            "torch_shape": list(want.shape)})
            continue
        static = [d.dim_value if d.HasField("dim_value") else None for d in declared[name].dim] \
            if name in declared else []
        # dim 0 is the batch: fixed-batch files run in chunks, so only later dims must agree
        if static and (len(static) != want.ndim
                       or any(s is not None and s != t for s, t in zip(static[1:], want.shape[1:]))):
            fails.append(f"output '{name}' is declared {static} in the file, PyTorch gives "
                         f"{list(want.shape)}")
        row = _compare(name, value, want, atol, rtol)
        outputs.append(row)
        if not row["ok"]:
            fails.append(f"output '{name}': {row['bad_elements']} element(s) over tolerance, max abs "
                         f"err {row['max_abs_err']:.3g} at {row['worst_index']}, max rel err "
                         f"{row['max_rel_err']:.3g} (atol {atol}, rtol {rtol})")
    return outputs, fails, got


def _compact_parity(compact: Path, feed: Feed, dense: list[np.ndarray], atol: float,
                    rtol: float, notes: list[str]) -> list[str]:
    """The compact sibling (sparse initializers) must load in ORT and match the dense file."""
    try:
        proto = load_model(compact)
        onnx.checker.check_model(proto)  # full_check cannot type sparse initializers feeding dense ops
        session = _make_session(str(compact))
        got = _run(session, [t.cpu().numpy() for t in feed])
    except Exception as exc:  # noqa: BLE001
        return [f"compact file {compact.name} does not load/run: {_short(exc)}"]
    fails = []
    for meta, a, b in zip(session.get_outputs(), got, dense):
        row = _compare(meta.name, a, b.astype(np.float64), atol, rtol)
        if not row["ok"]:
            fails.append(f"compact file {compact.name} output '{meta.name}' differs from the dense "
                         f"file: max abs err {row['max_abs_err']:.3g}")
    if not fails:
        notes.append(f"compact file {compact.name} checked: {len(proto.graph.sparse_initializer)} "
                     f"sparse initializer(s), outputs match the dense file")
    return fails


# --------------------------------------------------------------------------- the pipeline row


def _feeds(ctx: RunContext) -> list[list[torch.Tensor]]:
    """What verify compares: real validation samples; a token model at two sequence lengths
    (the batch's own and about half of it), so a sequence axis fixed by the exporter is caught."""
    batch = ctx.bundle.batch("val", ctx.cfg.verify.num_samples)
    task = ctx.task
    feeds = [task.inputs(batch)]
    if task.text_layout is not None:
        length = int(feeds[0][0].shape[1])
        shorter = max(2, (length + 1) // 2)
        if shorter < length:
            feeds.append(task.inputs(task.shorten(batch, shorter)))
    return feeds


def run_verify(ctx: RunContext) -> None:
    manifest = ctx.run.manifest
    if manifest.export is None:
        raise StageError("verify needs the export stage's result, and the manifest has none")
    ctx.model.eval().cpu()
    expectations = [LayerExpectation(layer.parameter, layer.pattern, layer.sparsity)
                    for layer in manifest.metrics.layers]
    with export_view(ctx.model, ctx.task) as view:
        result = verify_onnx(manifest.export.result(ctx.run.path), view, _feeds(ctx),
                                          expectations, ctx.cfg.verify)
    if manifest.export.quantization is not None:
        failures, result.quantized = verify_int8(ctx.run.path / manifest.export.quantization.file)
        result.failures += failures
        result.passed = not result.failures
    manifest.verify = result
    manifest.metrics.parity_max_abs_error = result.parity_max_abs_error
    manifest.metrics.pattern_coverage = result.pattern_coverage
    raise_on_failure(result)


ROW = Stage("verify", run_verify, enabled=lambda c: c.verify.enabled, section="verify", inputs=("verify",),
            redoable=True, all_ranks=False, results=("verify",))
