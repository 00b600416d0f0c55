"""Teacher EMA and optimizer steps fused with it: validation, pointer tables, dispatch.

    teacher ← momentum·teacher + (1 − momentum)·student     (= torch.lerp(teacher, student, 1 − momentum))

Dispatch (`sslfast._backend.use_csrc`): CUDA tensors with `sslfast._C` built → the csrc kernels
(csrc/ema.cu, csrc/optim.cu); CUDA without `_C` → torch's own multi-tensor ops (`_foreach_lerp_`,
`_fused_adamw_`); CPU (or SSLFAST_BACKEND=reference) → `sslfast.reference.ema`.

Pointer tables. A csrc launch takes a `TensorTable<depth>` (csrc/multi_tensor_apply.cuh) as its kernel
parameter: per row (tensor) one data pointer per list, the element count, the row's first chunk (a prefix sum
over chunks of CHUNK_ELEMS elements) and flags (16-byte aligned → vector path; has a teacher; LARS adapt /
decay). `build_tables` packs them here with numpy, byte for byte (`table_layout` mirrors the C++ struct and is
checked against `_C.table_layout` in CI), one table per (dtype, dtype) group and at most MAX_TENSORS rows per
table, skipping empty tensors. Tables are built once per list of tensors and cached (`_Cache`): a call then
only checks that the same tensors still sit at the same addresses with the same sizes, strides and dtypes
(`_ListKey`: the pointers by one C-level pass, the rest by one C++ guard object; any change rebuilds the plan,
which re-validates the tensors) and
launches: no host sync, and a few C calls per tensor of Python. Gradients, which change every step, are
written into the cached tables in place (`_FusedPlan._set_grads`).

Rows the kernels cannot take (a tensor that is not dense, or whose strides differ from its partners') are
updated by the reference path instead, in the same call.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import operator
import weakref
from numbers import Real
from typing import Iterable, Sequence

import numpy as np
import torch

from .. import _validate as V
from .._backend import backend, use_csrc
from ..reference import ema as _reference

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------ constants
# Mirrors of csrc/multi_tensor_apply.cuh (checked against sslfast._C in tests/test_ema.py).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAG_VECTOR, FLAG_TEACHER, FLAG_ADAPT, FLAG_DECAY = 1, 2, 4, 8
MAX_TENSORS = 448
VEC = 8                      # chunk sizes are multiples of this (the widest vector: 8 16-bit elements)
ALIGN = 16                   # bytes: the vector path needs every pointer of a row aligned to this
EMA_DEPTH, LARS_DEPTH, ADAMW_DEPTH = 2, 4, 6
CHUNK_ELEMS = 2048           # elements per chunk (one 256-thread block each), a multiple of VEC: on the H100
                             # the ViT-B EMA ran 0.356 ms at 2048 vs 0.373 ms at 8192 (benchmarks/RESULTS.md)
_MAX_CHUNKS = 2**31 - 1      # int32 chunk indices (and grid size)

_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_size = Tensor.size
_stride = Tensor.stride
_dtype_of = operator.attrgetter("dtype")


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def table_layout(depth: int, max_tensors: int = MAX_TENSORS) -> dict[str, int]:
    """Byte offsets of `TensorTable<depth>`'s fields and its size (natural alignment, as the C++ compiler
    lays it out: four int32 header fields, then uint64 ptr[depth][max], int64 numel[max],
    int32 chunk_start[max + 1], int32 flags[max], padded to 8 bytes)."""
    off = {"n_tensors": 0, "n_chunks": 4, "chunk_elems": 8, "ptr": 16}
    off["numel"] = off["ptr"] + 8 * depth * max_tensors
    off["chunk_start"] = off["numel"] + 8 * max_tensors
    off["flags"] = off["chunk_start"] + 4 * (max_tensors + 1)
    off["size"] = (off["flags"] + 4 * max_tensors + 7) // 8 * 8
    return off


@dataclasses.dataclass
class Table:
    """One kernel launch: the packed table and what it holds."""
    data: np.ndarray        # uint8, table_layout(depth)["size"] bytes
    depth: int
    dtypes: tuple           # dtype code of each list ((teacher, student) or (param, teacher))
    rows: np.ndarray        # int64: indices (into the caller's rows) of the table's rows, in table order
    n_chunks: int
    max_tensors: int = MAX_TENSORS

    views: dict = dataclasses.field(default_factory=dict, repr=False)

    def field(self, name: str) -> np.ndarray:
        """A writable typed view of one field (`ptr` as [depth, max_tensors])."""
        view = self.views.get(name)
        if view is None:
            lay = table_layout(self.depth, self.max_tensors)
            m = self.max_tensors
            spec = {"n_tensors": (np.int32, 1), "n_chunks": (np.int32, 1), "chunk_elems": (np.int32, 1),
                    "ptr": (np.uint64, self.depth * m), "numel": (np.int64, m), "chunk_start": (np.int32, m + 1),
                    "flags": (np.int32, m)}
            dt, count = spec[name]
            start = lay[name]
            view = self.data[start:start + np.dtype(dt).itemsize * count].view(dt)
            view = self.views[name] = view.reshape(self.depth, m) if name == "ptr" else view
        return view


def _aligned(ptrs) -> bool:
    return all(p % ALIGN == 0 for p in ptrs)


def build_tables(rows: Sequence[Sequence[Tensor | None]], keys: Sequence[tuple], *, depth: int,
                 flags: Sequence[int] | None = None, chunk_elems: int = CHUNK_ELEMS,
                 max_tensors: int = MAX_TENSORS, scalar_lists: tuple[int, ...] = ()) -> list[Table]:
    """Packs `rows` (each a tuple of `depth` tensors or None; the first one sets the element count) into
    launch tables, one group per distinct `keys[i]` (the per-list dtype codes) in order of first appearance,
    at most `max_tensors` rows per table. Empty tensors are left out. A row gets FLAG_VECTOR when all of its
    pointers (but those of `scalar_lists`, one-element tensors read as scalars) are 16-byte aligned, on top
    of `flags[i]`."""
    if chunk_elems <= 0 or chunk_elems % VEC:
        raise ValueError(f"chunk_elems must be a positive multiple of {VEC}, got {chunk_elems}")
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if len(row) != depth:
            raise ValueError(f"row {i} has {len(row)} tensors, the table depth is {depth}")
        if row[0].numel():
            groups.setdefault(tuple(keys[i]), []).append(i)
    tables = []
    for key, members in groups.items():
        start = 0
        while start < len(members):
            part, chunks = [], 0
            for i in members[start:start + max_tensors]:
                n = -(-rows[i][0].numel() // chunk_elems)
                if part and chunks + n > _MAX_CHUNKS:
                    break
                part.append(i)
                chunks += n
            tables.append(_pack(rows, part, key, depth, flags, chunk_elems, max_tensors, scalar_lists))
            start += len(part)
    return tables


def _pack(rows, part, key, depth, flags, chunk_elems, max_tensors, scalar_lists) -> Table:
    lay = table_layout(depth, max_tensors)
    table = Table(np.zeros(lay["size"], dtype=np.uint8), depth, tuple(key), np.asarray(part, dtype=np.int64), 0,
                  max_tensors)
    ptr, numel, chunk_start, flag = (table.field(f) for f in ("ptr", "numel", "chunk_start", "flags"))
    chunk = 0
    for j, i in enumerate(part):
        ptrs = [0 if t is None else _data_ptr(t) for t in rows[i]]
        ptr[:, j] = ptrs
        numel[j] = rows[i][0].numel()
        chunk_start[j] = chunk
        chunk += -(-int(numel[j]) // chunk_elems)
        vector = _aligned(p for k, p in enumerate(ptrs) if p and k not in scalar_lists)
        flag[j] = (flags[i] if flags is not None else 0) | (FLAG_VECTOR if vector else 0)
    chunk_start[len(part)] = chunk
    header = table.field("n_tensors")
    header[0] = len(part)
    table.field("n_chunks")[0] = chunk
    table.field("chunk_elems")[0] = chunk_elems
    table.n_chunks = chunk
    return table


_EXT = None


def _C():
    global _EXT
    if _EXT is None:
        from .. import _C as ext

        _EXT = ext
    return _EXT


def _stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as an integer (cudaStream_t), without building a Stream object."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(torch.cuda.current_device() if device.index is None else device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _launch_tables(device: torch.device, tables, weight: float | None, m_tensor: Tensor | None, launch) -> None:
    """`launch(table, ema_weight, momentum_ptr, stream)` for each table on `device`'s current stream: the EMA
    weight 1 − m as a float, or (weight None) the device momentum tensor's address for the kernel to read."""
    stream = _stream(device)
    mptr = 0 if m_tensor is None else m_tensor.data_ptr()
    w = 0.0 if weight is None else weight
    for tbl in tables:
        launch(tbl, w, mptr, stream)


# ------------------------------------------------------------------------------------------------ validation
def _tensor_list(name: str, value) -> list[Tensor]:
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a sequence of tensors (e.g. list(model.parameters())), got one tensor")
    try:
        items = value if isinstance(value, list) else list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(value).__name__}") from None
    return items


def _check_pairs(name_a: str, a: list[Tensor], name_b: str, b: list, *, b_optional: bool = False,
                 same_dtype: bool = False) -> torch.device | None:
    """Per-element checks between two parallel lists; returns their one device (None for empty lists)."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")
    device = None
    for i, (x, y) in enumerate(zip(a, b)):
        V.tensor(f"{name_a}[{i}]", x)
        if y is None and b_optional:
            continue
        V.tensor(f"{name_b}[{i}]", y)
        if x.shape != y.shape:
            raise ValueError(f"{name_b}[{i}] must have the shape of {name_a}[{i}], {tuple(x.shape)}, "
                             f"got {tuple(y.shape)}")
        if same_dtype and x.dtype != y.dtype:
            raise TypeError(f"{name_b}[{i}] must have the dtype of {name_a}[{i}], {x.dtype}, got {y.dtype}")
        if device is None:
            device = x.device
        for nm, t in ((name_a, x), (name_b, y)):
            if t.device != device:
                raise ValueError(f"all tensors must be on one device: {nm}[{i}] is on {t.device}, "
                                 f"{name_a}[0] on {device}")
    if device is None and a:
        device = a[0].device
    return device


def _unit(name: str, value: float) -> float:
    """`value` if it lies in [0, 1]; NaN fails both comparisons and is refused with everything else."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _momentum(name: str, value, device: torch.device | None):
    """(weight = 1 − m as a float, or None; momentum as a 0-dim fp32 device tensor, or None).

    Every momentum must lie in [0, 1] (NaN and ±inf are refused): a float or a CPU tensor is read and checked
    on the host (ValueError naming `name`). A CUDA tensor is not read on the host (that would cost a device sync
    per step, and a CUDA graph replays with whatever value the tensor holds then); instead a device-side
    assertion is queued on the current stream before the update (`torch._assert_async(clamp(m, 0, 1) == m)`:
    two tiny elementwise kernels and the assert, captured with the update by a CUDA graph). A value outside
    [0, 1] never extrapolates the teacher silently: it raises a device-side assert error, reported at the next
    synchronization (which, as every CUDA device assert, leaves the CUDA context unusable)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating tensor with one element, got "
                            f"{value.dtype} of shape {tuple(value.shape)}")
        if value.device.type == "cpu":  # a host scalar: reading it costs no device sync
            return 1.0 - _unit(name, float(value)), None
        if device is not None and value.device != device:
            raise ValueError(f"{name} must be on the tensors' device {device} (or on the CPU), got {value.device}")
        m = value.detach().reshape(()).to(torch.float32)
        torch._assert_async(m.clamp(0.0, 1.0) == m, f"{name} must lie in [0, 1] (a device tensor, checked on "
                                                    "the device)")
        return None, m
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in [0, 1] or a tensor, got {type(value).__name__}")
    return 1.0 - _unit(name, float(value)), None


def _reference_momentum(weight: float | None, m_tensor: Tensor | None):
    return m_tensor if m_tensor is not None else 1.0 - weight


_DENSE_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense in a layout the kernels can walk as a flat array."""
    if t.is_contiguous():
        return True
    return any(t.dim() == (4 if f is torch.channels_last else 5) and t.is_contiguous(memory_format=f)
               for f in _DENSE_FORMATS[1:])


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.is_contiguous() and b.is_contiguous() or (_dense(a) and _dense(b) and a.stride() == b.stride())


# ------------------------------------------------------------------------------------------------ plan cache
def _layout_key(tensors: Sequence[Tensor]) -> tuple:
    """What a plan's tables were built from, for one list of tensors: their data pointers (storage and offset),
    sizes, strides and dtypes, as four tuples. Built and compared by C-level passes (`map` over the tensor
    methods, tuple equality): a handful of C calls per tensor, no Python loop."""
    return (tuple(map(_data_ptr, tensors)), tuple(map(_size, tensors)), tuple(map(_stride, tensors)),
            tuple(map(_dtype_of, tensors)))


try:  # the C++ tensor checks of torch.compile's guards: Python type, dtype, device, sizes, strides, dispatch keys
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover (torch builds without dynamo)
    _TensorGuards = None


class _ListKey:
    """What a plan remembers of one list of tensors, and the check that they are unchanged: the same data
    pointers, sizes, strides and dtypes (`_layout_key`). A tensor keeps its identity through `resize_`, `t_()`,
    `as_strided_` or a `.data` swap, so each of these is compared, at every call.

    Where torch provides it, all but the pointers are checked by one `TensorGuards` object (C++, one call
    for the list, which also checks the device, Python type, requires_grad and dispatch keys: a change of
    those only rebuilds the plan): the pointers by one `map` and that call cost about half of the four
    `map` passes of `_layout_key` (ViT-B's 150 pairs). Otherwise, or if the guard does not accept the very
    tensors it was built from, the plan compares `_layout_key`."""

    __slots__ = ("ptrs", "guard", "layout")

    def __init__(self, tensors: Sequence[Tensor]):
        self.ptrs = tuple(map(_data_ptr, tensors))
        self.guard = _static_guard(tensors)
        self.layout = None if self.guard is not None else _layout_key(tensors)

    def matches(self, tensors: Sequence[Tensor]) -> bool:
        if self.guard is None:
            return self.layout == _layout_key(tensors)
        return self.ptrs == tuple(map(_data_ptr, tensors)) and self.guard.check(*tensors)


def _static_guard(tensors: Sequence[Tensor]):
    """A `TensorGuards` that accepts exactly these sizes and strides (every dimension static), or None."""
    if _TensorGuards is None:
        return None
    try:
        guard = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                              dynamic_dims_strides=[list(t.stride()) for t in tensors])
        return guard if guard.check(*tensors) else None
    except Exception:  # a private API: any change of its signature falls back to the layout key
        return None


class _Plan:
    """Launch tables for fixed lists of tensors. A plan records the layout (`_ListKey`: data pointers, sizes,
    strides, dtypes) of every list it was built from; it holds no reference to the tensors (the caller
    passes the lists at every call and checks them with `matches`)."""

    def _remember(self, lists: Sequence[Sequence[Tensor]]) -> None:
        self.keys = tuple(map(_ListKey, lists))

    def matches(self, lists: Sequence[Sequence[Tensor]], which: Sequence[int] | None = None) -> bool:
        """The tensors are still what the tables describe: same storage at the same addresses (no `.data` swap,
        no `module.to()` since), same sizes and strides (no `resize_`, `t_()`, `as_strided_`, `.data = view`)
        and same dtypes. `which`: the positions (in the remembered lists) of the given lists, when only some
        are checked. A mismatch makes the caller rebuild the plan, which re-validates the tensors (so a
        resized tensor is refused there rather than broadcast or read out of bounds)."""
        keys = self.keys if which is None else [self.keys[k] for k in which]
        return len(keys) == len(lists) and all(k.matches(lst) for k, lst in zip(keys, lists))


class _Cache:
    """Small LRU of plans keyed by the ids of the tensor objects they were built for. Every plan holds weak
    references with a callback that drops it when one of its tensors dies, so a key (ids) found in the cache
    always names the same live objects; a hit then only checks that their layout keys (data pointers, sizes,
    strides, dtypes) did not change, and a miss drops the plan so the caller validates and rebuilds."""

    def __init__(self, size: int = 16):
        self.size = size
        self.plans: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, lists):
        plan = self.plans.get(key)
        if plan is None:
            return None
        if not plan.matches(lists):
            del self.plans[key]
            return None
        self.plans.move_to_end(key)
        return plan

    def put(self, key, plan, lists):
        expire = functools.partial(self._expire, key, id(plan))
        plan._refs = [weakref.ref(t, expire) for lst in lists for t in lst]
        self.plans[key] = plan
        while len(self.plans) > self.size:
            self.plans.popitem(last=False)
        return plan

    def _expire(self, key, plan_id, _ref) -> None:
        if id(self.plans.get(key)) == plan_id:
            del self.plans[key]

    def clear(self):
        self.plans.clear()


# ------------------------------------------------------------------------------------------------ EMA
class _EMAPlan(_Plan):
    def __init__(self, teacher: list[Tensor], student: list[Tensor], device: torch.device | None):
        self.device = device
        self._remember((teacher, student))
        fast = [i for i, (t, s) in enumerate(zip(teacher, student)) if _same_layout(t, s)]
        self.fallback = [i for i, (t, s) in enumerate(zip(teacher, student)) if not _same_layout(t, s)]
        self.tables = build_tables([(teacher[i], student[i]) for i in fast],
                                   [(dtype_code(teacher[i].dtype), dtype_code(student[i].dtype)) for i in fast],
                                   depth=EMA_DEPTH)


_EMA_PLANS = _Cache()


def _ema_plan(teacher: list[Tensor], student: list[Tensor]) -> _EMAPlan:
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    lists = (teacher, student)
    plan = _EMA_PLANS.get(key, lists)
    if plan is None:
        device = _check_pairs("teacher_tensors", teacher, "student_tensors", student)
        plan = _EMA_PLANS.put(key, _EMAPlan(teacher, student, device), lists)
    return plan


def ema_update_(teacher_tensors: Iterable[Tensor], student_tensors: Iterable[Tensor], momentum) -> None:
    """teacher ← momentum·teacher + (1 − momentum)·student, in place, for every pair of the two lists.

    Computed as torch.lerp(teacher, student, 1 − momentum) in fp32 and rounded once to the teacher's dtype
    (fp32 results equal torch's lerp exactly). Teacher and student dtypes are independent (fp32 / bf16 /
    fp16); shapes must match pairwise and everything must sit on one device.

    `momentum`: a float in [0, 1], or a one-element floating tensor. On CUDA a device tensor is read by the
    kernel itself: no host sync, and a CUDA graph that captured the update uses the value the tensor holds at
    replay (change it with `momentum.fill_(m)` or compute it on the device). Warm the update up once before
    capturing (the first call builds and caches the launch tables). A momentum outside [0, 1] (NaN included)
    is refused: floats and CPU tensors with a ValueError, device tensors by a device-side assertion queued
    before the update (see `_momentum`).

    On CUDA with `sslfast._C`: one launch per (teacher dtype, student dtype) group of up to 448 tensors
    (a ViT-B's 150 parameters: one launch). Without `_C`: torch._foreach_lerp_. On the CPU: foreach lerp.
    """
    teacher = _tensor_list("teacher_tensors", teacher_tensors)
    student = _tensor_list("student_tensors", student_tensors)
    plan = _ema_plan(teacher, student)
    if not teacher:
        _momentum("momentum", momentum, None)
        return
    weight, m_tensor = _momentum("momentum", momentum, plan.device)
    if plan.device.type == "cuda" and use_csrc(teacher[0]):
        apply = _C().ema_apply
        _launch_tables(plan.device, plan.tables, weight, m_tensor, lambda tbl, w, mptr, stream: apply(
            tbl.data, tbl.dtypes[0], tbl.dtypes[1], w, mptr, stream, plan.device.index))
        if plan.fallback:
            _reference.ema_update_([teacher[i] for i in plan.fallback], [student[i] for i in plan.fallback],
                                   _reference_momentum(weight, m_tensor))
        return
    _reference.ema_update_(teacher, student, _reference_momentum(weight, m_tensor))


# ------------------------------------------------------------------------------------------------ fused steps
class _FusedPlan(_Plan):
    """Launch tables for one list of optimizer rows (param, grad, *states, teacher[, step scalar]).

    Built from the tensors that stay put between steps (`lists`: params, states..., teachers, extra); the
    gradients, new tensors at every backward, are written into the tables at each call (`_set_grads`), with
    the vector flag recomputed from their alignment. Rows whose tensors the kernels cannot walk as one flat
    array (`slow`) take the reference path; teachers whose layout differs from their param's are EMA'd after
    the step (`teacher_fallback`)."""

    def __init__(self, depth: int, params: list[Tensor], states: list[list[Tensor]], teachers: list,
                 extra: list[list[Tensor]], flags: list[int]):
        self.device = params[0].device if params else None
        self._remember([params, *states, *extra, [t for t in teachers if t is not None]])
        self.fast, self.slow, self.teacher_fallback, row_teacher = [], [], [], []
        for i, p in enumerate(params):
            if _dense(p) and all(_same_layout(p, s[i]) for s in states) and all(
                    x[i].numel() == 1 and x[i].is_contiguous() for x in extra):
                self.fast.append(i)
                t = teachers[i]
                if t is not None and not _same_layout(p, t):
                    self.teacher_fallback.append(i)
                    t = None
                row_teacher.append(t)
            else:
                self.slow.append(i)
        rows, keys, row_flags = [], [], []
        for i, t in zip(self.fast, row_teacher):
            p = params[i]
            rows.append([p, None, *(s[i] for s in states), t, *(x[i] for x in extra)])
            keys.append((dtype_code(p.dtype), dtype_code(t.dtype) if t is not None else None))
            row_flags.append(flags[i] | (FLAG_TEACHER if t is not None else 0))
        scalar_lists = tuple(range(depth - len(extra), depth))  # per-row scalars: alignment irrelevant
        self.tables = build_tables(rows, _merge_teacherless(keys), depth=depth, flags=row_flags,
                                   scalar_lists=scalar_lists)
        fast = np.asarray(self.fast, dtype=np.int64)
        self.contiguous = [p.is_contiguous() for p in params]
        self.all_contiguous = all(self.contiguous)
        for tbl in self.tables:
            tbl.members = fast[tbl.rows]  # indices into params
            members = tbl.members.tolist()
            tbl.pick = (None if members == list(range(len(params))) else
                        operator.itemgetter(*members) if len(members) > 1 else (lambda lst, m=members[0]: (lst[m],)))
            tbl.base_flags = tbl.field("flags")[:len(tbl.members)].copy()
            tbl.partials = None
            if depth == LARS_DEPTH and self.device is not None and self.device.type == "cuda":
                tbl.partials = torch.empty(2 * tbl.n_chunks, dtype=torch.float32, device=self.device)

    def _grads(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The gradients of the kernels' rows in their parameters' layout (a copy where a gradient's strides
        differ, e.g. a hand-assigned contiguous grad of a channels_last weight)."""
        if self.all_contiguous and all(map(_is_contiguous, grads)):
            return grads
        out = grads
        for i in self.fast:
            g = grads[i]
            if not (g.is_contiguous() if self.contiguous[i] else g.stride() == params[i].stride()):
                out = list(out) if out is grads else out
                out[i] = torch.empty_like(params[i]).copy_(g)
        return out

    def _set_grads(self, tbl: Table, grads: list[Tensor]) -> None:
        n = len(tbl.members)
        g = np.fromiter(map(_data_ptr, grads if tbl.pick is None else tbl.pick(grads)), dtype=np.uint64, count=n)
        tbl.field("ptr")[1, :n] = g
        tbl.field("flags")[:n] = np.where(g % ALIGN == 0, tbl.base_flags, tbl.base_flags & ~FLAG_VECTOR)

    def _launch_args(self, momentum):
        weight, m_tensor = _momentum("momentum", momentum, self.device)
        return weight, m_tensor, _reference_momentum(weight, m_tensor)

    def _csrc_step(self, params, grads, weight, m_tensor, launch):
        """The csrc step of every table (gradients written in first) when it applies; returns the rows left to
        the PyTorch paths: `slow`, or every row when the csrc kernels do not apply."""
        if not (self.device.type == "cuda" and use_csrc(params[0])):
            return range(len(params))

        def step(tbl, w, mptr, stream):
            self._set_grads(tbl, grads)
            launch(tbl, w, mptr, stream)

        _launch_tables(self.device, self.tables, weight, m_tensor, step)
        return self.slow

    def _teacher_fallback(self, rows, params, teachers, ref_m) -> None:
        """After a csrc step: the EMA of the teachers whose layout differs from their param's."""
        if self.teacher_fallback and rows is self.slow:
            _reference.ema_update_([teachers[i] for i in self.teacher_fallback],
                                   [params[i] for i in self.teacher_fallback], ref_m)


def _merge_teacherless(keys: list[tuple]) -> list[tuple]:
    """Rows without a teacher join a group of the same param dtype (the kernel never reads their teacher
    pointer), so they cost no extra launch."""
    by_param = {}
    for p, t in keys:
        if t is not None:
            by_param.setdefault(p, t)
    return [(p, t if t is not None else by_param.get(p, p)) for p, t in keys]


def _check_fused(params: list[Tensor], states: dict[str, list], teachers) -> torch.device | None:
    device = None
    for name, lst in states.items():
        device = _check_pairs("params", params, name, lst, same_dtype=True) or device
    if teachers is not None:
        device = _check_pairs("params", params, "teachers", teachers, b_optional=True) or device
    return device


def _check_steps(params: list[Tensor], steps: list) -> None:
    if len(steps) != len(params):
        raise ValueError(f"params and steps must have the same length, got {len(params)} and {len(steps)}")
    for i, (p, s) in enumerate(zip(params, steps)):
        if not isinstance(s, Tensor) or s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
            where = f" on {s.device}" if isinstance(s, Tensor) else ""
            got = s.dtype if isinstance(s, Tensor) else type(s).__name__
            raise TypeError(f"steps[{i}] must be a one-element float32 tensor on {p.device} (the step count), "
                            f"got {got}{where}")


def _teacher_list(teachers, n: int) -> list:
    return list(teachers) if teachers is not None else [None] * n


class AdamWEMAPlan(_FusedPlan):
    """Launch tables of `adamw_ema_step_` for fixed params / moments / steps / teachers."""

    def __init__(self, params, exp_avgs, exp_avg_sqs, steps, teachers):
        super().__init__(ADAMW_DEPTH, params, [exp_avgs, exp_avg_sqs], _teacher_list(teachers, len(params)),
                         [steps], [0] * len(params))

    def step_(self, params, grads, exp_avgs, exp_avg_sqs, steps, teachers, *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, momentum) -> None:
        """The tensors must be those the plan was built for (`matches`); grads have the params' shapes and
        dtypes (as `p.grad` always has)."""
        if not params:
            return
        teachers = _teacher_list(teachers, len(params))
        weight, m_tensor, ref_m = self._launch_args(momentum)
        grads = self._grads(params, grads)
        rows = self._csrc_step(params, grads, weight, m_tensor, lambda tbl, w, mptr, stream: _C().adamw_ema_apply(
            tbl.data, tbl.dtypes[0], tbl.dtypes[1], lr, beta1, beta2, eps, weight_decay, w, mptr, stream,
            self.device.index))
        if len(rows):
            sel = (lambda lst: lst) if len(rows) == len(params) else (lambda lst: [lst[i] for i in rows])
            args = (sel(params), sel(grads), sel(exp_avgs), sel(exp_avg_sqs), sel(steps), sel(teachers))
            hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, momentum=ref_m)
            if self.device.type == "cuda" and backend() != "reference" and len(rows) == len(params):
                _torch_fused_adamw_ema(*args, **hp)  # CUDA without sslfast._C
            else:
                _reference.adamw_ema_step_(*args, **hp)
        self._teacher_fallback(rows, params, teachers, ref_m)


def _torch_fused_adamw_ema(params, grads, exp_avgs, exp_avg_sqs, steps, teachers, *, lr, beta1, beta2, eps,
                           weight_decay, momentum) -> None:
    """CUDA without sslfast._C: torch's fused AdamW kernel, then foreach lerp (what users run today)."""
    with torch.no_grad():
        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.dtype, []).append(i)
        for idx in groups.values():
            sel = lambda lst: [lst[i] for i in idx]  # noqa: E731
            torch._foreach_add_(sel(steps), 1)
            torch._fused_adamw_(sel(params), sel(grads), sel(exp_avgs), sel(exp_avg_sqs), [], sel(steps), lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                                maximize=False)
    _reference._teacher_ema(params, teachers, momentum)


class LARSEMAPlan(_FusedPlan):
    """Launch tables of `lars_ema_step_` for fixed params / momentum buffers / teachers and per-param flags."""

    def __init__(self, params, momentum_buffers, teachers, decay, adapt):
        self.decay, self.adapt = list(decay), list(adapt)
        flags = [(FLAG_DECAY if d else 0) | (FLAG_ADAPT if a else 0) for d, a in zip(self.decay, self.adapt)]
        super().__init__(LARS_DEPTH, params, [momentum_buffers], _teacher_list(teachers, len(params)), [], flags)

    def step_(self, params, grads, momentum_buffers, teachers, *, lr: float, momentum: float, weight_decay: float,
              eta: float, ema_momentum) -> None:
        if not params:
            return
        teachers = _teacher_list(teachers, len(params))
        weight, m_tensor, ref_m = self._launch_args(ema_momentum)
        grads = self._grads(params, grads)
        rows = self._csrc_step(params, grads, weight, m_tensor, lambda tbl, w, mptr, stream: _C().lars_ema_apply(
            tbl.data, tbl.dtypes[0], tbl.dtypes[1], tbl.partials.data_ptr(), lr, momentum, weight_decay, eta, w,
            mptr, stream, self.device.index))
        if len(rows):
            sel = (lambda lst: lst) if len(rows) == len(params) else (lambda lst: [lst[i] for i in rows])
            _reference.lars_ema_step_(sel(params), sel(grads), sel(momentum_buffers), sel(teachers), lr=lr,
                                      momentum=momentum, weight_decay=weight_decay, eta=eta, decay=sel(self.decay),
                                      adapt=sel(self.adapt), ema_momentum=ref_m)
        self._teacher_fallback(rows, params, teachers, ref_m)


_FUSED_PLANS = _Cache()


def _real(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """`value` as a float, finite and within [low, high] (either bound optional): NaN and ±inf are refused."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)):
        bounds = (f" in [{low}, {high}]" if low is not None and high is not None else
                  f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number{bounds}, got {value}")
    return value


def adamw_ema_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                    exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor],
                    teachers: Sequence[Tensor | None] | None = None, *, lr: float = 1e-3,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                    momentum=0.996) -> None:
    """One AdamW step (torch.optim.AdamW math: decoupled weight decay, bias-corrected moments) on every
    params[i], and teachers[i] ← lerp(teachers[i], new params[i], 1 − momentum) where teachers[i] is given.

    On CUDA with `sslfast._C` this is one kernel (after a one-block launch that increments the `steps`): it
    reads param, grad, exp_avg, exp_avg_sq and teacher once and writes param, moments and teacher once
    (36 bytes per fp32 parameter instead of 40 for AdamW(fused=True) + _foreach_lerp_, and one pass instead
    of two). `steps` are one-element fp32 tensors on the params' device (torch's fused-AdamW state), so the
    bias corrections are computed on the device: no host sync. Moments have the params' dtype; teachers may
    have any of fp32 / bf16 / fp16. `sslfast.optim.AdamWEMA` wraps this as an optimizer.
    """
    params, grads = _tensor_list("params", params), _tensor_list("grads", grads)
    exp_avgs, exp_avg_sqs = _tensor_list("exp_avgs", exp_avgs), _tensor_list("exp_avg_sqs", exp_avg_sqs)
    steps = _tensor_list("steps", steps)
    teachers = None if teachers is None else _tensor_list("teachers", teachers)
    beta1, beta2 = (_real(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
    lr, eps, weight_decay = _real("lr", lr, 0.0), _real("eps", eps, 0.0), _real("weight_decay", weight_decay, 0.0)
    lists = (params, exp_avgs, exp_avg_sqs, steps, [t for t in teachers if t is not None] if teachers else [])
    key = ("adamw", *(tuple(map(id, lst)) for lst in lists),
           None if teachers is None else tuple(t is None for t in teachers))
    plan = _FUSED_PLANS.get(key, lists)
    if plan is None:
        _check_fused(params, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, teachers)
        _check_steps(params, steps)
        plan = _FUSED_PLANS.put(key, AdamWEMAPlan(params, exp_avgs, exp_avg_sqs, steps, teachers), lists)
    _check_pairs("params", params, "grads", grads, same_dtype=True)
    plan.step_(params, grads, exp_avgs, exp_avg_sqs, steps, teachers, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
               weight_decay=weight_decay, momentum=momentum)


def lars_ema_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                   teachers: Sequence[Tensor | None] | None = None, *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, eta: float = 1e-3, exclude=_reference.exclude_bias_and_norm,
                   ema_momentum=0.996) -> None:
    """One LARS step with BYOL / Barlow Twins semantics (see `sslfast.reference.ema`), then
    teachers[i] ← lerp(teachers[i], new params[i], 1 − ema_momentum) where teachers[i] is given.

    Parameters for which `exclude(p)` is true (default: biases and norm weights, p.ndim <= 1) get neither
    weight decay nor the trust ratio. On CUDA with `sslfast._C`: two launches and no host sync (a pass that
    writes per-chunk squared norms of p and of g + wd·p to a device buffer, then the update pass, where each
    block sums its tensor's partials and applies q = η‖p‖/‖g + wd·p‖). `sslfast.optim.LARSEMA` wraps this.
    """
    params, grads = _tensor_list("params", params), _tensor_list("grads", grads)
    bufs = _tensor_list("momentum_buffers", momentum_buffers)
    teachers = None if teachers is None else _tensor_list("teachers", teachers)
    lr, momentum = _real("lr", lr, 0.0), _real("momentum", momentum, 0.0, 1.0)
    weight_decay, eta = _real("weight_decay", weight_decay, 0.0), _real("eta", eta, 0.0)
    keep = [not (exclude is not None and bool(exclude(p))) for p in params]
    lists = (params, bufs, [t for t in teachers if t is not None] if teachers else [])
    key = ("lars", *(tuple(map(id, lst)) for lst in lists),
           None if teachers is None else tuple(t is None for t in teachers), tuple(keep))
    plan = _FUSED_PLANS.get(key, lists)
    if plan is None:
        _check_fused(params, {"momentum_buffers": bufs}, teachers)
        plan = _FUSED_PLANS.put(key, LARSEMAPlan(params, bufs, teachers, keep, keep), lists)
    _check_pairs("params", params, "grads", grads, same_dtype=True)
    plan.step_(params, grads, bufs, teachers, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
               ema_momentum=ema_momentum)

# ------------------------------------------------------------------------------------------------ DINO center
_CENTER_DTYPES = V.FLOAT_DTYPES + (torch.float64,)


def update_center_(center: Tensor, teacher_output: Tensor, momentum: float = 0.9) -> None:
    """DINO's center EMA, in place: center ← m·center + (1 − m)·mean of `teacher_output` over the batch,
    the mean taken over all ranks when torch.distributed is initialized (as DINOLoss.update_center).

    center: [1, K] or [K]; teacher_output: [N, K] (e.g. the teacher's outputs of all global crops). Both may
    be fp32, bf16, fp16 or fp64, independently (the batch mean is taken in fp32, fp64 for fp64 outputs); this
    is plain PyTorch on every device. `momentum` must be a finite number in [0, 1]."""
    if not isinstance(center, Tensor):
        raise TypeError(f"center must be a torch.Tensor [1, K] or [K], got {type(center).__name__}")
    V.tensor("center", center, dtypes=_CENTER_DTYPES)
    out = V.tensor("teacher_output", teacher_output, ndim=2, shape_hint="[N, K]", dtypes=_CENTER_DTYPES)
    if out.shape[0] == 0:
        raise ValueError("teacher_output must have at least one row, got shape (0, K)")
    if center.numel() != out.shape[1] or center.dim() > 2 or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center must be [1, K] or [K] with K = {out.shape[1]} (teacher_output's), got "
                         f"{tuple(center.shape)}")
    V.same_device(center=center, teacher_output=out)
    m = _real("momentum", momentum, 0.0, 1.0)
    _reference.update_center_(center, out, m)
