"""The EMA family's csrc launch plans: pointer tables mirroring csrc/multi_tensor_apply.cuh, packed with numpy,
and the cache of plans that makes a call with unchanged tensors cost a few C calls per tensor.

Pointer tables. A csrc launch takes a `TensorTable<depth>` (csrc/multi_tensor_apply.cuh) as its kernel
parameter: per row (tensor) one data pointer per list, the element count, the row's first chunk (a prefix sum
over chunks of CHUNK_ELEMS elements) and flags (16-byte aligned → vector path; has a teacher; LARS adapt /
decay). `build_tables` packs them byte for byte (`table_layout` mirrors the C++ struct and is checked against
`_C.table_layout` in CI), one table per (dtype, dtype) group and at most MAX_TENSORS rows per table, skipping
empty tensors.

Plans. Tables are built once per list of tensors and cached (`PlanCache`): a call then only checks that the
same tensors still sit at the same addresses with the same sizes, strides and dtypes (`_ListKey`: the pointers
by one C-level pass, the rest by one C++ guard object; any change rebuilds the plan, which re-validates the
tensors) and launches: no host sync, and a few C calls per tensor of Python. Gradients, which change every
step, are written into the cached tables in place (`FusedPlan.set_grads`). Rows the kernels cannot take (a
tensor that is not dense, or whose strides differ from its partners') are listed by the plan and updated by
the PyTorch path in the same call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
import weakref
from typing import Sequence

import numpy as np
import torch

Tensor = torch.Tensor

# Mirrors of csrc/multi_tensor_apply.cuh (checked against sslfast._C by the tests).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAG_VECTOR, FLAG_TEACHER, FLAG_ADAPT, FLAG_DECAY = 1, 2, 4, 8
MAX_TENSORS = 448
VEC = 8  # chunk sizes are multiples of this (the widest vector: 8 16-bit elements)
ALIGN = 16  # bytes: the vector path needs every pointer of a row aligned to this
EMA_DEPTH, LARS_DEPTH, ADAMW_DEPTH = 2, 4, 6
CHUNK_ELEMS = 2048  # elements per chunk (one 256-thread block each), a multiple of VEC: on the H100
# the ViT-B EMA ran 0.356 ms at 2048 vs 0.373 ms at 8192 (benchmarks/RESULTS.md)
_MAX_CHUNKS = 2**31 - 1  # int32 chunk indices (and grid size)

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

    data: np.ndarray  # uint8, table_layout(depth)["size"] bytes
    depth: int
    dtypes: tuple  # dtype code of each list ((teacher, student) or (param, teacher))
    rows: np.ndarray  # int64: indices (into the caller's rows) of the table's rows, in table order
    n_chunks: int
    max_tensors: int = MAX_TENSORS

    views: dict = dataclasses.field(default_factory=dict, repr=False)

    def field(self, name: str) -> np.ndarray:
        """A writable typed view of one field (`ptr` as [depth, max_tensors])."""
        view = self.views.get(name)
        if view is None:
            lay = table_layout(self.depth, self.max_tensors)
            m = self.max_tensors
            spec = {
                "n_tensors": (np.int32, 1),
                "n_chunks": (np.int32, 1),
                "chunk_elems": (np.int32, 1),
                "ptr": (np.uint64, self.depth * m),
                "numel": (np.int64, m),
                "chunk_start": (np.int32, m + 1),
                "flags": (np.int32, m),
            }
            dt, count = spec[name]
            start = lay[name]
            view = self.data[start : start + np.dtype(dt).itemsize * count].view(dt)
            view = self.views[name] = view.reshape(self.depth, m) if name == "ptr" else view
        return view


def _aligned(ptrs) -> bool:
    return all(p % ALIGN == 0 for p in ptrs)


def build_tables(
    rows: Sequence[Sequence[Tensor | None]],
    keys: Sequence[tuple],
    *,
    depth: int,
    flags: Sequence[int] | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    max_tensors: int = MAX_TENSORS,
    scalar_lists: tuple[int, ...] = (),
) -> list[Table]:
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
            for i in members[start : start + max_tensors]:
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
    table = Table(
        np.zeros(lay["size"], dtype=np.uint8), depth, tuple(key), np.asarray(part, dtype=np.int64), 0, max_tensors
    )
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


_DENSE_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense in a layout the kernels can walk as a flat array."""
    if t.is_contiguous():
        return True
    return any(
        t.dim() == (4 if f is torch.channels_last else 5) and t.is_contiguous(memory_format=f)
        for f in _DENSE_FORMATS[1:]
    )


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.is_contiguous() and b.is_contiguous() or (_dense(a) and _dense(b) and a.stride() == b.stride())


def _layout_key(tensors: Sequence[Tensor]) -> tuple:
    """What a plan's tables were built from, for one list of tensors: their data pointers (storage and offset),
    sizes, strides and dtypes, as four tuples. Built and compared by C-level passes (`map` over the tensor
    methods, tuple equality): a handful of C calls per tensor, no Python loop."""
    return (
        tuple(map(_data_ptr, tensors)),
        tuple(map(_size, tensors)),
        tuple(map(_stride, tensors)),
        tuple(map(_dtype_of, tensors)),
    )


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
        guard = _TensorGuards(
            *tensors,
            dynamic_dims_sizes=[list(t.shape) for t in tensors],
            dynamic_dims_strides=[list(t.stride()) for t in tensors],
        )
        return guard if guard.check(*tensors) else None
    except Exception:  # a private API: any change of its signature falls back to the layout key
        return None


class Plan:
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


class PlanCache:
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


class EMAPlan(Plan):
    """Launch tables of `ema_update_` for fixed teacher / student lists: the pairs of one layout in `tables`,
    the others' indices in `fallback` (updated by the PyTorch path)."""

    def __init__(self, teacher: list[Tensor], student: list[Tensor], device: torch.device | None):
        self.device = device
        self._remember((teacher, student))
        fast = [i for i, (t, s) in enumerate(zip(teacher, student)) if _same_layout(t, s)]
        self.fallback = [i for i, (t, s) in enumerate(zip(teacher, student)) if not _same_layout(t, s)]
        self.tables = build_tables(
            [(teacher[i], student[i]) for i in fast],
            [(dtype_code(teacher[i].dtype), dtype_code(student[i].dtype)) for i in fast],
            depth=EMA_DEPTH,
        )


class FusedPlan(Plan):
    """Launch tables for one list of optimizer rows (param, grad, *states, teacher[, step scalar]).

    Built from the tensors that stay put between steps (`lists`: params, states..., teachers, extra); the
    gradients, new tensors at every backward, are written into the tables at each call (`set_grads`), with
    the vector flag recomputed from their alignment. Rows whose tensors the kernels cannot walk as one flat
    array (`slow`) take the PyTorch path; teachers whose layout differs from their param's are EMA'd after
    the step (`teacher_fallback`)."""

    def __init__(
        self,
        depth: int,
        params: list[Tensor],
        states: list[list[Tensor]],
        teachers: list,
        extra: list[list[Tensor]],
        flags: list[int],
    ):
        self.device = params[0].device if params else None
        self._remember([params, *states, *extra, [t for t in teachers if t is not None]])
        self.fast, self.slow, self.teacher_fallback, row_teacher = [], [], [], []
        for i, p in enumerate(params):
            if (
                _dense(p)
                and all(_same_layout(p, s[i]) for s in states)
                and all(x[i].numel() == 1 and x[i].is_contiguous() for x in extra)
            ):
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
        self.tables = build_tables(
            rows, _merge_teacherless(keys), depth=depth, flags=row_flags, scalar_lists=scalar_lists
        )
        fast = np.asarray(self.fast, dtype=np.int64)
        self.contiguous = [p.is_contiguous() for p in params]
        self.all_contiguous = all(self.contiguous)
        for tbl in self.tables:
            tbl.members = fast[tbl.rows]  # indices into params
            members = tbl.members.tolist()
            tbl.pick = (
                None
                if members == list(range(len(params)))
                else operator.itemgetter(*members)
                if len(members) > 1
                else (lambda lst, m=members[0]: (lst[m],))
            )
            tbl.base_flags = tbl.field("flags")[: len(tbl.members)].copy()
            tbl.partials = None
            if depth == LARS_DEPTH and self.device is not None and self.device.type == "cuda":
                tbl.partials = torch.empty(2 * tbl.n_chunks, dtype=torch.float32, device=self.device)

    def param_layout_grads(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
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

    def set_grads(self, tbl: Table, grads: list[Tensor]) -> None:
        """Writes the gradients' pointers into `tbl` and recomputes its rows' vector flags."""
        n = len(tbl.members)
        g = np.fromiter(map(_data_ptr, grads if tbl.pick is None else tbl.pick(grads)), dtype=np.uint64, count=n)
        tbl.field("ptr")[1, :n] = g
        tbl.field("flags")[:n] = np.where(g % ALIGN == 0, tbl.base_flags, tbl.base_flags & ~FLAG_VECTOR)


def _merge_teacherless(keys: list[tuple]) -> list[tuple]:
    """Rows without a teacher join a group of the same param dtype (the kernel never reads their teacher
    pointer), so they cost no extra launch."""
    by_param = {}
    for p, t in keys:
        if t is not None:
            by_param.setdefault(p, t)
    return [(p, t if t is not None else by_param.get(p, p)) for p, t in keys]
