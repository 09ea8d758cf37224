"""Weight values as ONNX defines them: dense or sparse (COO) tensors, Cast, (de)quantization, N:M.

The read-back in `stages.onnx_sparsity` follows a weight from its storage to the op that consumes
it; this module does the arithmetic on the way, exactly as a runtime would, because a zero is
only a zero if the runtime sees one:

- Cast applies the target type (fp32 values that underflow in fp16 become zeros; float8 casts
  saturate like ONNX's `saturate=1`).
- QuantizeLinear rounds half to even, adds the zero point and saturates to the output type;
  DequantizeLinear computes `(q - zero_point) * scale` with per-tensor, per-axis or blocked
  (opset 21 `block_size`) parameters, so a zero is where the stored value equals the zero point
  of its channel or block. FP8/FP4 values are decoded as floats (never truncated to integers).
- bfloat16, float8 and int4 tensors come from onnx as ml_dtypes arrays; `numeric` decodes them
  to float32 / int64 exactly before anything counts zeros.

Bounded work: a sparse initializer may declare a huge dense shape with a handful of values. It
stays in COO form (linear indices + values) through Identity/Cast/Transpose/Reshape, and its
sparsity and N:M groups are counted from the indices, in O(nnz log nnz). Densifying is needed
only for (de)quantization; tensors above `MAX_DENSE_ELEMENTS` are refused with `OversizedTensor`
instead of being allocated.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

# Largest tensor the read-back densifies from a sparse form (2**27 elements = 512 MiB as fp32).
MAX_DENSE_ELEMENTS = 1 << 27
# Largest declared size accepted at all; linear indices must fit int64.
MAX_DECLARED_ELEMENTS = 1 << 62

_ML_FLOATS = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
              "float8_e8m0fnu", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn", "float8_e3m4",
              "float8_e4m3", "float8_e4m3b11fnuz"}
_ML_INTS = {"int2", "uint2", "int4", "uint4"}


class UnreadableTensor(ValueError):
    """A stored tensor is malformed (indices out of range, sizes that do not match)."""


class OversizedTensor(UnreadableTensor):
    """A tensor the read-back would have to allocate densely is larger than allowed."""


def dtype_kind(dtype: np.dtype) -> str:
    """'f' for any float type (ml_dtypes' bfloat16/float8/float4 included), 'i' for integers,
    'b' for bool, '?' otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind in "fc" or dtype.name in _ML_FLOATS:
        return "f"
    if dtype.kind in "iu" or dtype.name in _ML_INTS:
        return "i"
    return "b" if dtype.kind == "b" else "?"


def numeric(values: np.ndarray) -> np.ndarray:
    """Decode ml_dtypes arrays exactly: floats to float32, int4/int2 to int64; others unchanged."""
    name = values.dtype.name
    if name in _ML_FLOATS:
        return values.astype(np.float32)
    if name in _ML_INTS:
        return values.astype(np.int64)
    return values


def onnx_np_dtype(elem_type: int) -> np.dtype:
    """numpy (or ml_dtypes) dtype of an ONNX element type; ValueError for strings and unknowns."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unsupported ONNX element type {elem_type}") from exc
    if dtype_kind(dtype) == "?":
        raise ValueError(f"unsupported ONNX element type {elem_type} ({dtype})")
    return dtype


def _float_max(dtype: np.dtype) -> float:
    return float(ml_dtypes.finfo(dtype).max if dtype.name in _ML_FLOATS else np.finfo(dtype).max)


def _int_range(dtype: np.dtype) -> tuple[int, int]:
    info = ml_dtypes.iinfo(dtype) if dtype.name in _ML_INTS else np.iinfo(dtype)
    return int(info.min), int(info.max)


def cast(values: np.ndarray, dtype: np.dtype, saturate: bool = True) -> np.ndarray:
    """ONNX Cast: float->int truncates, float->narrow float rounds (and saturates to the finite
    range for float8/float4 when `saturate`, as ONNX's default does)."""
    src = numeric(values)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if dtype_kind(dtype) == "f" and dtype.name in _ML_FLOATS and saturate \
                and dtype_kind(src.dtype) == "f":
            top = _float_max(dtype)
            src = np.clip(src.astype(np.float32), -top, top)
        return src.astype(dtype)


def _param(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int,
           what: str) -> np.ndarray:
    """Broadcast a (de)quantization parameter to `shape`: per tensor, per axis or blocked."""
    ndim = len(shape)
    if param.size == 1 and param.ndim <= 1 and not block_size:
        return param.reshape(())
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} out of range for input of rank {ndim}")
    axis %= ndim
    if block_size:
        blocks = -(-shape[axis] // block_size)
        want = tuple(blocks if i == axis else d for i, d in enumerate(shape))
        if param.shape != want:
            raise ValueError(f"{what} of shape {list(param.shape)} does not fit input {list(shape)} "
                             f"with axis {axis} and block_size {block_size} (expected {list(want)})")
        return np.take(np.repeat(param, block_size, axis=axis), np.arange(shape[axis]), axis=axis)
    if param.ndim != 1 or param.size != shape[axis]:
        raise ValueError(f"{what} of shape {list(param.shape)} does not fit input {list(shape)} "
                         f"along axis {axis}")
    view = [1] * ndim
    view[axis] = param.size
    return param.reshape(view)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int,
               block_size: int, out_dtype: np.dtype | None = None) -> np.ndarray:
    """DequantizeLinear: (q - zero_point) * scale, in float32, then in the output type (the
    scale's type unless `out_dtype`). Integer inputs subtract exactly in int64; FP8/FP4 inputs
    are decoded as floats."""
    shape = tuple(int(d) for d in q.shape)
    s = _param(numeric(scale).astype(np.float32), shape, axis, block_size, "scale")
    if dtype_kind(q.dtype) == "f":
        centered = numeric(q).astype(np.float32)
        if zero is not None:
            centered = centered - _param(numeric(zero).astype(np.float32), shape, axis, block_size,
                                         "zero point")
    else:
        centered = numeric(q).astype(np.int64)
        if zero is not None:
            centered = centered - _param(numeric(zero).astype(np.int64), shape, axis, block_size,
                                         "zero point")
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        out = centered.astype(np.float32) * s
    return cast(out, np.dtype(out_dtype) if out_dtype is not None else scale.dtype)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block_size: int,
             out_dtype: np.dtype, saturate: bool = True) -> np.ndarray:
    """QuantizeLinear: saturate(round_half_even(x / scale) + zero_point) for integer outputs;
    cast(x / scale) (saturating by default) for float8/float4 outputs."""
    shape = tuple(int(d) for d in x.shape)
    s = _param(numeric(scale).astype(np.float32), shape, axis, block_size, "scale")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        scaled = numeric(x).astype(np.float32) / s
        if dtype_kind(out_dtype) == "f":
            if zero is not None:
                scaled = scaled + _param(numeric(zero).astype(np.float32), shape, axis, block_size,
                                         "zero point")
            return cast(scaled, out_dtype, saturate)
        rounded = np.rint(scaled).astype(np.float64)
        if zero is not None:
            rounded = rounded + _param(numeric(zero).astype(np.int64), shape, axis, block_size,
                                       "zero point")
        low, high = _int_range(out_dtype)
        return np.clip(np.nan_to_num(rounded, nan=0.0), low, high).astype(np.int64).astype(out_dtype)


# ----------------------------------------------------------------------------- N:M checks


@dataclass
class NMCheck:
    """Result of checking N:M along one axis. `location` indexes the tensor as checked."""

    n: int
    m: int
    applicable: bool  # reduction size divisible by M
    holds: bool
    groups: int = 0
    bad_groups: int = 0
    location: str | None = None  # e.g. "[5, 4:8, 0, 1]" - the first violating group
    location_nnz: int | None = None

    def describe(self) -> str:
        if not self.applicable:
            return f"{self.n}:{self.m} not applicable (reduction size not divisible by {self.m})"
        if self.holds:
            return f"{self.n}:{self.m} holds"
        return (f"{self.bad_groups} of {self.groups} groups have more than {self.n} nonzeros, "
                f"first at {self.location} ({self.location_nnz} nonzeros)")


def _location(pos: tuple[int, ...], axis: int, m: int) -> str:
    """Group position (other axes in order, group index last) -> '[a, g*m:g*m+m, b]'."""
    parts = [str(int(p)) for p in pos[:-1]]
    gidx = int(pos[-1])
    parts.insert(axis, f"{gidx * m}:{gidx * m + m}")
    return "[" + ", ".join(parts) + "]"


def check_nm(values: np.ndarray, axis: int, n: int, m: int) -> NMCheck:
    """At most n nonzeros in every run of m consecutive elements along `axis` (vectorised)."""
    values = numeric(values)
    axis %= values.ndim
    size = values.shape[axis]
    if size % m:
        return NMCheck(n, m, applicable=False, holds=False)
    moved = np.moveaxis(values, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], size // m, m)
    nnz = np.count_nonzero(groups, axis=-1)
    bad = nnz > n
    bad_count = int(np.count_nonzero(bad))
    result = NMCheck(n, m, applicable=True, holds=bad_count == 0, groups=int(nnz.size),
                     bad_groups=bad_count)
    if bad_count:
        pos = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
        result.location = _location(tuple(int(p) for p in pos), axis, m)
        result.location_nnz = int(nnz[pos])
    return result


# ----------------------------------------------------------------------------- dense or COO


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


@dataclass
class Tensor:
    """A weight's values, dense (`dense`) or COO (`indices`: unique C-order linear indices into
    `shape`, `nz`: the stored values there; every other element is zero)."""

    shape: tuple[int, ...]
    dense: np.ndarray | None = None
    indices: np.ndarray | None = None
    nz: np.ndarray | None = None

    @classmethod
    def of(cls, array: np.ndarray) -> Tensor:
        return cls(tuple(int(d) for d in array.shape), dense=array)

    @classmethod
    def from_sparse(cls, sp: onnx.SparseTensorProto, name: str) -> Tensor:
        """Read a SparseTensorProto without densifying; checks indices are in range and unique."""
        shape = tuple(int(d) for d in sp.dims)
        if any(d < 0 for d in shape):
            raise UnreadableTensor(f"sparse tensor '{name}': negative dimension in {list(shape)}")
        numel = _numel(shape)
        if numel > MAX_DECLARED_ELEMENTS:
            raise OversizedTensor(f"sparse tensor '{name}' declares {numel} elements "
                                  f"(shape {list(shape)}), more than {MAX_DECLARED_ELEMENTS}")
        values = numpy_helper.to_array(sp.values).reshape(-1)
        idx = numpy_helper.to_array(sp.indices).astype(np.int64)
        if idx.ndim == 2:
            if idx.shape != (values.size, len(shape)):
                raise UnreadableTensor(f"sparse tensor '{name}': indices of shape {list(idx.shape)} do not "
                                 f"match {values.size} values of rank {len(shape)}")
            if idx.size and (np.any(idx < 0) or np.any(idx >= np.asarray(shape, np.int64))):
                raise UnreadableTensor(f"sparse tensor '{name}': an index is outside shape {list(shape)}")
            idx = np.ravel_multi_index(tuple(idx.T), shape) if idx.size else idx.reshape(-1)
        idx = idx.reshape(-1)
        if idx.size != values.size:
            raise UnreadableTensor(f"sparse tensor '{name}': {idx.size} indices for {values.size} values")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise UnreadableTensor(f"sparse tensor '{name}': an index is outside shape {list(shape)}")
        if np.unique(idx).size != idx.size:
            raise UnreadableTensor(f"sparse tensor '{name}': repeated indices")
        return cls(shape, indices=idx, nz=values)

    @property
    def is_sparse(self) -> bool:
        return self.dense is None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def dtype(self) -> np.dtype:
        arr = self.dense if self.dense is not None else self.nz
        assert arr is not None
        return arr.dtype

    def to_dense(self, what: str = "tensor") -> np.ndarray:
        """The dense array; a COO tensor above MAX_DENSE_ELEMENTS raises OversizedTensor."""
        if self.dense is not None:
            return self.dense
        assert self.indices is not None and self.nz is not None
        if self.numel > MAX_DENSE_ELEMENTS:
            raise OversizedTensor(f"{what} of shape {list(self.shape)} ({self.numel} elements) is "
                                  f"stored sparse and would have to be densified; the limit is "
                                  f"{MAX_DENSE_ELEMENTS} elements")
        out = np.zeros(self.numel, dtype=self.nz.dtype)
        out[self.indices] = self.nz
        return out.reshape(self.shape)

    def map_values(self, fn: Callable[[np.ndarray], np.ndarray]) -> Tensor:
        """Apply an elementwise function that maps 0 to 0 (Cast, decoding) in either form."""
        if self.dense is not None:
            return Tensor.of(fn(self.dense))
        assert self.nz is not None
        return Tensor(self.shape, indices=self.indices, nz=fn(self.nz))

    def transpose(self, perm: tuple[int, ...]) -> Tensor:
        if sorted(perm) != list(range(self.ndim)):
            raise ValueError(f"Transpose perm {list(perm)} does not fit rank {self.ndim}")
        if self.dense is not None:
            return Tensor.of(np.transpose(self.dense, perm))
        assert self.indices is not None
        shape = tuple(self.shape[p] for p in perm)
        if not self.indices.size:
            return Tensor(shape, indices=self.indices, nz=self.nz)
        coords = np.unravel_index(self.indices, self.shape)
        return Tensor(shape, indices=np.ravel_multi_index(tuple(coords[p] for p in perm), shape),
                      nz=self.nz)

    def reshape(self, shape: tuple[int, ...]) -> Tensor:
        if _numel(shape) != self.numel:
            raise ValueError(f"cannot reshape {list(self.shape)} to {list(shape)}")
        if self.dense is not None:
            return Tensor.of(self.dense.reshape(shape))
        return Tensor(tuple(shape), indices=self.indices, nz=self.nz)  # C-order: same indices

    def count_nonzero(self) -> int:
        arr = self.dense if self.dense is not None else self.nz
        assert arr is not None
        return int(np.count_nonzero(numeric(arr)))

    def sparsity(self) -> float:
        """Fraction of exact zeros (a COO tensor counts from its stored values)."""
        return 0.0 if self.numel == 0 else 1.0 - self.count_nonzero() / self.numel

    def check_nm(self, axis: int, n: int, m: int) -> NMCheck:
        """N:M along `axis`; a COO tensor is checked from its indices without densifying."""
        if self.dense is not None:
            return check_nm(self.dense, axis, n, m)
        assert self.indices is not None and self.nz is not None
        axis %= self.ndim
        size = self.shape[axis]
        if size % m:
            return NMCheck(n, m, applicable=False, holds=False)
        groups = self.numel // m
        live = self.indices[np.flatnonzero(numeric(self.nz))]
        if not live.size:
            return NMCheck(n, m, applicable=True, holds=True, groups=groups)
        coords = list(np.unravel_index(live, self.shape))
        gidx = coords.pop(axis) // m
        gshape = tuple(d for i, d in enumerate(self.shape) if i != axis) + (size // m,)
        keys = np.ravel_multi_index(tuple(coords) + (gidx,), gshape)
        uniq, counts = np.unique(keys, return_counts=True)
        bad = counts > n
        bad_count = int(np.count_nonzero(bad))
        result = NMCheck(n, m, applicable=True, holds=bad_count == 0, groups=groups,
                         bad_groups=bad_count)
        if bad_count:
            first = int(np.flatnonzero(bad)[0])  # keys are sorted: the first group in C order
            pos = np.unravel_index(int(uniq[first]), gshape)
            result.location = _location(tuple(int(p) for p in pos), axis, m)
            result.location_nnz = int(counts[first])
        return result
