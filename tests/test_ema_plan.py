"""The EMA family's csrc plumbing, checked on the CPU without launching: the extension is built where nvcc is,
the pointer tables mirror csrc/multi_tensor_apply.cuh and are packed correctly, plans are cached and rebuilt,
and the csrc implementation (`sslfast.ops._csrc.ema`) launches one table each and leaves the right rows to the
PyTorch path (checked with a stand-in for `sslfast._C` that records the launches)."""

import os
import shutil
import types

import numpy as np
import pytest
import torch

import sslfast as sf
from sslfast import _backend
from sslfast.ops import _ema_plan as P
from sslfast.ops import ema as ops
from sslfast.ops._csrc import ema as C
from sslfast.ops.fused_optim import AdamWEMAPlan, LARSEMAPlan

from ema_testing import M, SHAPES, lists


def _nvcc_present() -> bool:
    if os.environ.get("SSLFAST_NO_CUDA_BUILD") == "1":
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(
        shutil.which("nvcc")
        or (home and os.path.isfile(os.path.join(home, "bin", "nvcc")))
        or os.path.isfile("/usr/local/cuda/bin/nvcc")
    )


needs_csrc = pytest.mark.skipif(not _backend.csrc_available(), reason="sslfast._C was not built (no nvcc)")


# ------------------------------------------------------------------------------------------ csrc build
def test_csrc_built_when_nvcc_present():
    """CI installs with nvcc on the machine: then `sslfast._C` must exist and import (no GPU needed)."""
    if not _nvcc_present():
        pytest.skip("nvcc not found: the extension is optional")
    from sslfast import _C  # noqa: F401  (ImportError here = the csrc build failed or was skipped)

    assert _backend.csrc_available()


@needs_csrc
def test_python_tables_match_csrc_layout():
    from sslfast import _C

    for depth in (P.EMA_DEPTH, P.LARS_DEPTH, P.ADAMW_DEPTH):
        assert P.table_layout(depth) == dict(_C.table_layout(depth)), f"depth {depth}"
        assert P.table_layout(depth)["size"] <= 32764 - 64, "kernel parameters must fit CUDA's 32 KB limit"
    assert (_C.MAX_TENSORS, _C.VEC, _C.EMA_DEPTH, _C.LARS_DEPTH, _C.ADAMW_DEPTH) == (
        P.MAX_TENSORS,
        P.VEC,
        P.EMA_DEPTH,
        P.LARS_DEPTH,
        P.ADAMW_DEPTH,
    )
    assert (_C.FLAG_VECTOR, _C.FLAG_TEACHER, _C.FLAG_ADAPT, _C.FLAG_DECAY) == (
        P.FLAG_VECTOR,
        P.FLAG_TEACHER,
        P.FLAG_ADAPT,
        P.FLAG_DECAY,
    )
    assert {k: v for k, v in _C.DTYPE_CODES.items()} == {
        str(k).replace("torch.", ""): v for k, v in P.DTYPE_CODES.items()
    }
    with pytest.raises(ValueError, match="uint8 buffer"):  # a wrong-sized table is refused before any launch
        _C.ema_apply(np.zeros(8, np.uint8), 0, 0, 0.1, 0, 0, 0)


# ------------------------------------------------------------------------------------------ pointer tables
def test_tables_chunking_prefix_and_skips_empty():
    numels = [5, 0, 8192, 8193, 20000, 8]
    rows = [(torch.empty(n), torch.empty(n)) for n in numels]
    (tbl,) = P.build_tables(rows, [(0, 0)] * len(rows), depth=2, chunk_elems=8192)
    kept = [0, 2, 3, 4, 5]
    chunks = [1, 1, 2, 3, 1]
    assert list(tbl.rows) == kept
    assert tbl.field("n_tensors")[0] == len(kept) and tbl.n_chunks == tbl.field("n_chunks")[0] == sum(chunks)
    assert tbl.field("chunk_elems")[0] == 8192
    assert list(tbl.field("chunk_start")[: len(kept) + 1]) == [0, 1, 2, 4, 7, 8]
    assert list(tbl.field("numel")[: len(kept)]) == [numels[i] for i in kept]
    ptr = tbl.field("ptr")
    for j, i in enumerate(kept):
        assert (ptr[0, j], ptr[1, j]) == (rows[i][0].data_ptr(), rows[i][1].data_ptr())
    assert not ptr[:, len(kept) :].any() and not tbl.field("flags")[len(kept) :].any()
    assert tbl.data.nbytes == P.table_layout(2)["size"]
    with pytest.raises(ValueError, match="multiple of 8"):
        P.build_tables(rows, [(0, 0)] * len(rows), depth=2, chunk_elems=100)


def test_tables_group_by_dtype_and_split_at_capacity():
    f32, bf16 = P.dtype_code(torch.float32), P.dtype_code(torch.bfloat16)
    assert (f32, bf16, P.dtype_code(torch.float16)) == (0, 1, 2)
    rows = [
        (torch.empty(4), torch.empty(4, dtype=d))
        for d in [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    ]
    keys = [(f32, P.dtype_code(s.dtype)) for _, s in rows]
    tables = P.build_tables(rows, keys, depth=2, max_tensors=2)
    assert [(t.dtypes, list(t.rows)) for t in tables] == [((0, 0), [0, 2]), ((0, 0), [3]), ((0, 1), [1, 4])]
    for t in tables:
        assert list(t.field("chunk_start")[: len(t.rows) + 1]) == list(range(len(t.rows) + 1))


def test_tables_vector_flag_needs_every_pointer_aligned():
    base = torch.empty(64)  # caching/CPU allocators align storage far beyond 16 bytes
    aligned, shifted = base[8:24], base[1:17]  # 32 bytes in / 4 bytes in
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 == 4
    rows = [(aligned, aligned), (aligned, shifted), (shifted, aligned)]
    (tbl,) = P.build_tables(rows, [(0, 0)] * 3, depth=2, flags=[P.FLAG_TEACHER, 0, P.FLAG_ADAPT])
    assert list(tbl.field("flags")[:3]) == [P.FLAG_TEACHER | P.FLAG_VECTOR, 0, P.FLAG_ADAPT]


def test_fused_plan_rows_and_gradient_refresh():
    params = [torch.randn(s) for s in [(33, 7), (64,), (0,), (5, 2, 3, 3)]]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    teachers = [torch.randn(p.shape, dtype=torch.bfloat16) for p in params]
    teachers[1] = None
    plan = AdamWEMAPlan(params, *states, steps, teachers)
    (tbl,) = plan.tables
    assert tbl.dtypes == (P.dtype_code(torch.float32), P.dtype_code(torch.bfloat16))
    assert list(tbl.members) == [0, 1, 3]  # the empty tensor has no row
    ptr = tbl.field("ptr")
    for j, i in enumerate(tbl.members):
        want = [params[i], None, states[0][i], states[1][i], teachers[i], steps[i]]
        assert list(ptr[:, j]) == [0 if t is None else t.data_ptr() for t in want]
    flags = tbl.field("flags")[:3]
    assert [bool(f & P.FLAG_TEACHER) for f in flags] == [True, False, True]
    base = torch.empty(64 * 1024)
    grads = [base[:231].view(33, 7), base[1024:1088], torch.empty(0), base[4097 : 4097 + 90].view(5, 2, 3, 3)]
    plan.set_grads(tbl, grads)
    assert list(ptr[1, :3]) == [grads[i].data_ptr() for i in (0, 1, 3)]
    assert [bool(f & P.FLAG_VECTOR) for f in tbl.field("flags")[:3]] == [True, True, False]  # grad 3 misaligned


def test_plans_are_cached_and_rebuilt_when_storage_moves():
    teacher, student = lists(SHAPES)
    sf.ema_update_(teacher, student, M)
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    plan = ops._EMA_PLANS.plans[key]
    sf.ema_update_(teacher, student, M)
    assert ops._EMA_PLANS.plans[key] is plan
    teacher[3].data = teacher[3].data.clone()  # same tensor object, new storage: the table would be stale
    sf.ema_update_(teacher, student, M)
    assert ops._EMA_PLANS.plans[key] is not plan


def test_plans_expire_with_their_tensors():
    import gc

    teacher, student = lists(SHAPES[:3])
    sf.ema_update_(teacher, student, M)
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    assert key in ops._EMA_PLANS.plans
    del student[1]
    gc.collect()
    assert key not in ops._EMA_PLANS.plans, "a plan must not outlive its tensors (their ids may be reused)"


def test_layouts_the_kernels_take():
    cl = [torch.randn(4, 6, 5, 3).to(memory_format=torch.channels_last) for _ in range(2)]
    pairs = [
        (torch.randn(6, 4).t(), torch.randn(4, 6)),  # strides differ: reference path
        (cl[0], cl[1]),  # channels_last both: one flat array
        (torch.randn(4, 6)[:, ::2], torch.randn(4, 3)),  # not dense: reference path
        (torch.randn(3, 5), torch.randn(3, 5)),
    ]
    plan = P.EMAPlan([t for t, _ in pairs], [s for _, s in pairs], torch.device("cpu"))
    assert plan.fallback == [0, 2]
    assert [int(n) for n in plan.tables[0].field("numel")[:2]] == [360, 15]
    teacher, student = [t.clone() for t, _ in pairs], [s for _, s in pairs]
    want = [t.lerp(s, 1 - M) for t, s in zip(teacher, student)]
    sf.ema_update_(teacher, student, M)
    assert all(torch.equal(a, b) for a, b in zip(teacher, want))


# ------------------------------------------------------------------------------------------ csrc dispatch
@pytest.fixture
def fake_ext(monkeypatch):
    """`sslfast._C` replaced by a recorder of its launches, the CUDA stream by 0 (the tables are real)."""
    calls = []
    ext = types.SimpleNamespace(
        **{
            name: (lambda *args, name=name: calls.append((name, args)))
            for name in ("ema_apply", "adamw_ema_apply", "lars_ema_apply")
        }
    )
    monkeypatch.setattr(C, "extension", lambda: ext)
    monkeypatch.setattr(C, "stream", lambda device: 0)
    return calls


def test_family_dispatch_and_lazy_extension():
    """CPU tensors take the PyTorch module; the csrc module is the family's fast module and imports without
    the extension."""
    assert ops.FAMILY.impl(torch.zeros(2)) is ops.FAMILY.torch
    assert ops.FAMILY.kernels is C and C._EXT is None or _backend.csrc_available()
    # the fused optimizer steps and DINO's center update live in their own modules, exported by `sslfast.ops`
    from sslfast.ops import dino, fused_optim

    assert sf.ops.adamw_ema_step_ is fused_optim.adamw_ema_step_ and sf.ops.lars_ema_step_ is fused_optim.lars_ema_step_
    assert sf.ops.update_center_ is dino.update_center_
    assert not hasattr(ops, "adamw_ema_step_") and not hasattr(ops, "update_center_")


def test_csrc_ema_launches_each_table_and_lerps_the_fallback(fake_ext):
    pairs = [
        (torch.randn(6, 4).t(), torch.randn(4, 6)),  # strides differ: PyTorch path
        (torch.randn(5, 3), torch.randn(5, 3)),
        (torch.randn(7).to(torch.bfloat16), torch.randn(7)),
    ]  # another dtype group: another table
    teacher, student = [t for t, _ in pairs], [s for _, s in pairs]
    plan = P.EMAPlan(teacher, student, torch.device("cpu"))
    before = [t.clone() for t in teacher]
    C.ema_update_(plan, teacher, student, weight=1 - M, m_tensor=None)
    assert [(name, args[1:4]) for name, args in fake_ext] == [
        ("ema_apply", (t.dtypes[0], t.dtypes[1], 1 - M)) for t in plan.tables
    ]
    assert len(plan.tables) == 2 and plan.fallback == [0]
    assert torch.equal(teacher[0], before[0].lerp(student[0], 1 - M))
    assert torch.equal(teacher[1], before[1]) and torch.equal(teacher[2], before[2]), "the kernels' rows"


@pytest.mark.parametrize("slow_rows", ["none", "some", "all"])
def test_csrc_adamw_steps_the_slow_rows(fake_ext, monkeypatch, slow_rows):
    """Rows the kernels cannot take: all of them by torch's fused AdamW, some of them by the foreach step."""
    dense = [torch.randn(4, 3), torch.randn(5)]
    strided = [torch.randn(4, 6)[:, ::2], torch.randn(3, 8)[:, ::4]]
    params = {"none": dense, "some": dense[:1] + strided[:1], "all": strided}[slow_rows]
    grads, teachers = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    used = []
    for name in ("adamw_fused_step_", "adamw_foreach_step_"):
        monkeypatch.setattr(C._torch, name, lambda *a, name=name, **k: used.append((name, len(a[0]))))
    plan = AdamWEMAPlan(params, *states, steps, teachers)
    C.adamw_ema_step_(
        plan,
        params,
        grads,
        *states,
        steps,
        teachers,
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.0,
        weight=0.5,
        m_tensor=None,
    )
    assert [name for name, _ in fake_ext] == ["adamw_ema_apply"] * len(plan.tables)
    want = {"none": [], "some": [("adamw_foreach_step_", 1)], "all": [("adamw_fused_step_", 2)]}[slow_rows]
    assert used == want


def test_csrc_lars_writes_grads_then_lerps_fallback_teachers(fake_ext):
    params = [torch.randn(6, 4), torch.randn(3)]
    teachers = [torch.randn(4, 6).t(), torch.randn(3)]  # the first has another layout than its param
    grads = [torch.randn_like(p) for p in params]
    plan = LARSEMAPlan(params, [torch.zeros_like(p) for p in params], teachers, [True, False], [True, False])
    plan.tables[0].partials = torch.zeros(2 * plan.tables[0].n_chunks)  # allocated on CUDA only
    t0 = teachers[0].clone()
    C.lars_ema_step_(
        plan,
        params,
        grads,
        [torch.zeros_like(p) for p in params],
        teachers,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        eta=1e-3,
        weight=0.25,
        m_tensor=None,
    )
    assert [name for name, _ in fake_ext] == ["lars_ema_apply"]
    assert list(plan.tables[0].field("ptr")[1, :2]) == [g.data_ptr() for g in grads]
    assert torch.equal(teachers[0], t0.lerp(params[0], 0.25)), "the teacher of another layout, after the step"
