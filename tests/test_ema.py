"""Teacher EMA (`sf.ema_update_`, `sf.EMA`), the fused optimizer steps (`sslfast.optim`) and DINO's center.

CPU: the csrc extension is built and its pointer tables are packed correctly (without launching); the
reference paths equal torch's lerp / torch.optim.AdamW / the official Barlow Twins LARS over several steps;
schedules, module behaviour, bad input. GPU (`-m gpu`): the csrc kernels against the same oracles, the
fallback without `_C`, and CUDA-graph capture with a device-scalar momentum.
"""
import math
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import sslfast as sf
from sslfast import _backend
from sslfast.bench import capture
from sslfast.bench import ema as bench_ema
from sslfast.ops import ema as ops
from sslfast.optim import AdamWEMA, LARSEMA
from sslfast.reference import ema as R

from distributed_harness import run_ranks
from helpers import assert_close

SHAPES = [(37, 3, 3, 3), (37,), (1, 5, 48), (48, 37), (48,), (0, 4), (3,), (129, 65)]
M = 0.996


def _lists(shapes, t_dtype=torch.float32, s_dtype=torch.float32, device="cpu"):
    teacher = [torch.randn(s, device=device).to(t_dtype) for s in shapes]
    student = [torch.randn(s, device=device).to(s_dtype) for s in shapes]
    return teacher, student


def _lerp_oracle(teacher, student, momentum):
    """fp32 lerp of the upcast tensors, rounded once to the teacher dtype."""
    return [t.float().lerp(s.float(), 1 - momentum).to(t.dtype) for t, s in zip(teacher, student)]


def _ulp_close(out, ref, what=""):
    """Equal up to one unit in the last place of the output dtype (rounding of a tie-breaking difference)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    if out.numel() == 0:
        return
    eps = torch.finfo(out.dtype).eps
    tol = eps * ref.double().abs().clamp_min(torch.finfo(out.dtype).tiny)
    bad = (out.double() - ref.double()).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ by more than 1 ulp"


def _nvcc_present() -> bool:
    if os.environ.get("SSLFAST_NO_CUDA_BUILD") == "1":
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc") or (home and os.path.isfile(os.path.join(home, "bin", "nvcc")))
                or os.path.isfile("/usr/local/cuda/bin/nvcc"))


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

    for depth in (ops.EMA_DEPTH, ops.LARS_DEPTH, ops.ADAMW_DEPTH):
        assert ops.table_layout(depth) == dict(_C.table_layout(depth)), f"depth {depth}"
        assert ops.table_layout(depth)["size"] <= 32764 - 64, "kernel parameters must fit CUDA's 32 KB limit"
    assert (_C.MAX_TENSORS, _C.VEC, _C.EMA_DEPTH, _C.LARS_DEPTH, _C.ADAMW_DEPTH) == (
        ops.MAX_TENSORS, ops.VEC, ops.EMA_DEPTH, ops.LARS_DEPTH, ops.ADAMW_DEPTH)
    assert (_C.FLAG_VECTOR, _C.FLAG_TEACHER, _C.FLAG_ADAPT, _C.FLAG_DECAY) == (
        ops.FLAG_VECTOR, ops.FLAG_TEACHER, ops.FLAG_ADAPT, ops.FLAG_DECAY)
    assert {k: v for k, v in _C.DTYPE_CODES.items()} == {str(k).replace("torch.", ""): v
                                                          for k, v in ops.DTYPE_CODES.items()}
    with pytest.raises(ValueError, match="uint8 buffer"):  # a wrong-sized table is refused before any launch
        _C.ema_apply(np.zeros(8, np.uint8), 0, 0, 0.1, 0, 0, 0)


# ------------------------------------------------------------------------------------------ pointer tables
def test_tables_chunking_prefix_and_skips_empty():
    numels = [5, 0, 8192, 8193, 20000, 8]
    rows = [(torch.empty(n), torch.empty(n)) for n in numels]
    (tbl,) = ops.build_tables(rows, [(0, 0)] * len(rows), depth=2, chunk_elems=8192)
    kept = [0, 2, 3, 4, 5]
    chunks = [1, 1, 2, 3, 1]
    assert list(tbl.rows) == kept
    assert tbl.field("n_tensors")[0] == len(kept) and tbl.n_chunks == tbl.field("n_chunks")[0] == sum(chunks)
    assert tbl.field("chunk_elems")[0] == 8192
    assert list(tbl.field("chunk_start")[:len(kept) + 1]) == [0, 1, 2, 4, 7, 8]
    assert list(tbl.field("numel")[:len(kept)]) == [numels[i] for i in kept]
    ptr = tbl.field("ptr")
    for j, i in enumerate(kept):
        assert (ptr[0, j], ptr[1, j]) == (rows[i][0].data_ptr(), rows[i][1].data_ptr())
    assert not ptr[:, len(kept):].any() and not tbl.field("flags")[len(kept):].any()
    assert tbl.data.nbytes == ops.table_layout(2)["size"]
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.build_tables(rows, [(0, 0)] * len(rows), depth=2, chunk_elems=100)


def test_tables_group_by_dtype_and_split_at_capacity():
    f32, bf16 = ops.dtype_code(torch.float32), ops.dtype_code(torch.bfloat16)
    assert (f32, bf16, ops.dtype_code(torch.float16)) == (0, 1, 2)
    rows = [(torch.empty(4), torch.empty(4, dtype=d)) for d in
            [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]]
    keys = [(f32, ops.dtype_code(s.dtype)) for _, s in rows]
    tables = ops.build_tables(rows, keys, depth=2, max_tensors=2)
    assert [(t.dtypes, list(t.rows)) for t in tables] == [((0, 0), [0, 2]), ((0, 0), [3]), ((0, 1), [1, 4])]
    for t in tables:
        assert list(t.field("chunk_start")[:len(t.rows) + 1]) == list(range(len(t.rows) + 1))


def test_tables_vector_flag_needs_every_pointer_aligned():
    base = torch.empty(64)                  # caching/CPU allocators align storage far beyond 16 bytes
    aligned, shifted = base[8:24], base[1:17]  # 32 bytes in / 4 bytes in
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 == 4
    rows = [(aligned, aligned), (aligned, shifted), (shifted, aligned)]
    (tbl,) = ops.build_tables(rows, [(0, 0)] * 3, depth=2, flags=[ops.FLAG_TEACHER, 0, ops.FLAG_ADAPT])
    assert list(tbl.field("flags")[:3]) == [ops.FLAG_TEACHER | ops.FLAG_VECTOR, 0, ops.FLAG_ADAPT]


def test_fused_plan_rows_and_gradient_refresh():
    params = [torch.randn(s) for s in [(33, 7), (64,), (0,), (5, 2, 3, 3)]]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    teachers = [torch.randn(p.shape, dtype=torch.bfloat16) for p in params]
    teachers[1] = None
    plan = ops.AdamWEMAPlan(params, *states, steps, teachers)
    (tbl,) = plan.tables
    assert tbl.dtypes == (ops.dtype_code(torch.float32), ops.dtype_code(torch.bfloat16))
    assert list(tbl.members) == [0, 1, 3]  # the empty tensor has no row
    ptr = tbl.field("ptr")
    for j, i in enumerate(tbl.members):
        want = [params[i], None, states[0][i], states[1][i], teachers[i], steps[i]]
        assert list(ptr[:, j]) == [0 if t is None else t.data_ptr() for t in want]
    flags = tbl.field("flags")[:3]
    assert [bool(f & ops.FLAG_TEACHER) for f in flags] == [True, False, True]
    base = torch.empty(64 * 1024)
    grads = [base[:231].view(33, 7), base[1024:1088], torch.empty(0), base[4097:4097 + 90].view(5, 2, 3, 3)]
    plan._set_grads(tbl, grads)
    assert list(ptr[1, :3]) == [grads[i].data_ptr() for i in (0, 1, 3)]
    assert [bool(f & ops.FLAG_VECTOR) for f in tbl.field("flags")[:3]] == [True, True, False]  # grad 3 misaligned


def test_plans_are_cached_and_rebuilt_when_storage_moves():
    teacher, student = _lists(SHAPES)
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

    teacher, student = _lists(SHAPES[:3])
    sf.ema_update_(teacher, student, M)
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    assert key in ops._EMA_PLANS.plans
    del student[1]
    gc.collect()
    assert key not in ops._EMA_PLANS.plans, "a plan must not outlive its tensors (their ids may be reused)"


def test_layouts_the_kernels_take():
    cl = [torch.randn(4, 6, 5, 3).to(memory_format=torch.channels_last) for _ in range(2)]
    pairs = [(torch.randn(6, 4).t(), torch.randn(4, 6)),          # strides differ: reference path
             (cl[0], cl[1]),                                      # channels_last both: one flat array
             (torch.randn(4, 6)[:, ::2], torch.randn(4, 3)),      # not dense: reference path
             (torch.randn(3, 5), torch.randn(3, 5))]
    plan = ops._EMAPlan([t for t, _ in pairs], [s for _, s in pairs], torch.device("cpu"))
    assert plan.fallback == [0, 2]
    assert [int(n) for n in plan.tables[0].field("numel")[:2]] == [360, 15]
    teacher, student = [t.clone() for t, _ in pairs], [s for _, s in pairs]
    want = [t.lerp(s, 1 - M) for t, s in zip(teacher, student)]
    sf.ema_update_(teacher, student, M)
    assert all(torch.equal(a, b) for a, b in zip(teacher, want))


# ------------------------------------------------------------------------------------------ EMA numerics
@pytest.mark.parametrize("momentum", [M, 0.3, 1.0, 0.0])
def test_ema_equals_lerp_exactly_fp32(seed, momentum):
    teacher, student = _lists(SHAPES)
    want = [t.lerp(s, 1 - momentum) for t, s in zip(teacher, student)]
    sf.ema_update_(teacher, student, momentum)
    for i, (t, w) in enumerate(zip(teacher, want)):
        assert torch.equal(t, w), f"tensor {i} (seed {seed})"
    # and the EMA formula itself in float64
    t64, s64 = _lists(SHAPES, torch.float64, torch.float64)
    want64 = [momentum * t + (1 - momentum) * s for t, s in zip(t64, s64)]
    t32 = [t.float() for t in t64]
    sf.ema_update_(t32, [s.float() for s in s64], momentum)
    for t, w in zip(t32, want64):
        if t.numel():
            assert_close(t, w, 1e-6, "fp32 EMA vs float64 formula")


@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_ema_low_precision_within_rounding(seed, t_dtype, s_dtype):
    teacher, student = _lists(SHAPES, t_dtype, s_dtype)
    want = _lerp_oracle(teacher, student, M)
    sf.ema_update_(teacher, student, M)
    for i, (t, w) in enumerate(zip(teacher, want)):
        assert t.dtype == t_dtype
        _ulp_close(t, w, f"tensor {i} {t_dtype}<-{s_dtype} (seed {seed})")


def test_ema_momentum_as_tensor_and_iterables(seed):
    teacher, student = _lists(SHAPES)
    t2 = [t.clone() for t in teacher]
    sf.ema_update_(teacher, student, torch.tensor(0.9))  # its fp32 value, 0.8999999762
    sf.ema_update_(iter(t2), (s for s in student), float(torch.tensor(0.9)))
    for a, b in zip(teacher, t2):
        assert torch.equal(a, b)


def test_ema_zero_size_and_empty_lists():
    sf.ema_update_([], [], M)
    t, s = [torch.empty(0, 3)], [torch.empty(0, 3)]
    sf.ema_update_(t, s, M)
    assert t[0].shape == (0, 3)


def test_ema_teacher_that_requires_grad():
    model = nn.Linear(4, 3)
    teacher = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    want = [t.detach().lerp(p.detach(), 1 - M) for t, p in zip(teacher, model.parameters())]
    sf.ema_update_(teacher, model.parameters(), M)
    for t, w in zip(teacher, want):
        assert torch.equal(t.detach(), w)


@pytest.mark.parametrize("call,exc,match", [
    (lambda t, s: sf.ema_update_(t[:2], s, M), ValueError, "teacher_tensors and student_tensors"),
    (lambda t, s: sf.ema_update_(t, s[:1] + [torch.randn(5)] + s[2:], M), ValueError, r"student_tensors\[1\]"),
    (lambda t, s: sf.ema_update_([torch.zeros(37, 3, 3, 3, dtype=torch.long)] + t[1:], s, M), TypeError,
     r"teacher_tensors\[0\]"),
    (lambda t, s: sf.ema_update_(t, s[:2] + [s[2].to("meta")] + s[3:], M), ValueError, "one device"),
    (lambda t, s: sf.ema_update_(t, s, 1.5), ValueError, "momentum"),
    (lambda t, s: sf.ema_update_(t, s, "0.9"), TypeError, "momentum"),
    (lambda t, s: sf.ema_update_(t, s, torch.tensor([0.9, 0.9])), TypeError, "momentum"),
    (lambda t, s: sf.ema_update_(t[0], s[0], M), TypeError, "teacher_tensors"),
    (lambda t, s: sf.ema_update_(t, 3, M), TypeError, "student_tensors"),
])
def test_ema_bad_input(call, exc, match):
    teacher, student = _lists(SHAPES)
    before = [t.clone() for t in teacher]
    with pytest.raises(exc, match=match):
        call(teacher, student)
    assert all(torch.equal(a, b) for a, b in zip(teacher, before)), "nothing may be updated on bad input"


# ------------------------------------------------------------------------------------------ schedules
def test_cosine_momentum_is_byol_and_dino():
    base, K = 0.99, 1000
    for k in (0, 1, 250, 500, 999):
        byol = 1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2   # BYOL §3.2
        assert R.cosine_momentum(k, K, base, 1.0) == pytest.approx(byol, abs=1e-15)
        dino = 0.9 + 0.5 * (base - 0.9) * (1 + math.cos(math.pi * k / K))  # DINO cosine_scheduler, final 0.9
        assert R.cosine_momentum(k, K, base, 0.9) == pytest.approx(dino, abs=1e-15)
    assert R.cosine_momentum(K, K, base) == 1.0 and R.cosine_momentum(5 * K, K, base) == 1.0
    assert R.cosine_momentum(123, None, base) == base
    steps = torch.tensor([0.0, 250.0, 1000.0, 2000.0])
    got = R.cosine_momentum(steps, K, base)
    assert torch.allclose(got.double(), torch.tensor([R.cosine_momentum(int(k), K, base) for k in steps],
                                                     dtype=torch.float64), atol=1e-7)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_ema_module_schedule_params_and_buffers(seed):
    student = _Net()
    ema = sf.EMA(student, momentum=0.9, final_momentum=1.0, total_steps=4)
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    expected = [p.detach().clone() for p in student.parameters()]
    for k in range(6):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student(torch.randn(2, 3, 6, 6))  # train mode: BatchNorm running statistics move
        m = R.cosine_momentum(k, 4, 0.9, 1.0)
        assert ema.momentum == m
        expected = [e.lerp(p.detach(), 1 - m) for e, p in zip(expected, student.parameters())]
        ema.update()
        for t, e in zip(ema.teacher.parameters(), expected):
            assert torch.equal(t, e)
        for tb, sb in zip(ema.teacher.buffers(), student.buffers()):
            assert torch.equal(tb, sb)
    assert ema.step == 6 and ema.momentum == 1.0
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ema(x), ema.teacher(x))


def test_ema_module_state_dict_roundtrip():
    student = _Net()
    ema = sf.EMA(student, momentum=0.99, total_steps=100)
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
        ema.update()
    state = ema.state_dict()
    assert any(k.startswith("teacher.") for k in state)
    other = sf.EMA(_Net(), momentum=0.5)
    other.load_state_dict(state)
    assert other.step == 3 and other.base_momentum == 0.99 and other.total_steps == 100
    assert other.momentum == ema.momentum
    for a, b in zip(other.teacher.state_dict().values(), ema.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_module_passed_teacher_and_mismatch():
    student = _Net()
    teacher = _Net().to(torch.bfloat16)
    ema = sf.EMA(student, teacher, momentum=0.5)
    assert ema.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
    want = [t.float().lerp(s.detach(), 0.5).to(torch.bfloat16) for t, s in zip(teacher.parameters(),
                                                                               student.parameters())]
    ema.update()
    for t, w in zip(teacher.parameters(), want):
        _ulp_close(t.detach(), w)
    with pytest.raises(ValueError, match="teacher must have the student's parameters"):
        sf.EMA(student, nn.Linear(3, 3))
    other = _Net()
    other.head = nn.Linear(5, 7)
    with pytest.raises(ValueError, match="teacher.head.weight"):
        sf.EMA(student, other)
    with pytest.raises(ValueError, match="total_steps"):
        sf.EMA(student, total_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        sf.EMA(student, momentum=1.2)


def test_ema_module_follows_replaced_parameters():
    student = _Net()
    ema = sf.EMA(student, momentum=0.5)
    new = {k: v + 1 for k, v in student.state_dict().items()}
    student.load_state_dict(new, assign=True)  # new Parameter objects
    want = [t.detach().lerp(s.detach(), 0.5) for t, s in zip(ema.teacher.parameters(), student.parameters())]
    ema.update()
    for t, w in zip(ema.teacher.parameters(), want):
        assert torch.equal(t, w)


def _ddp_rank(rank, world, seed):
    """DDP-wrapped student: EMA unwraps it; DINO's center is averaged over the global batch."""
    torch.manual_seed(seed)
    student = nn.parallel.DistributedDataParallel(_Net())
    ema = sf.EMA(student, momentum=0.9)
    assert ema.student is student.module
    out = student(torch.randn(2, 3, 6, 6))
    out.sum().backward()
    with torch.no_grad():
        for p in student.parameters():
            p.sub_(0.1 * p.grad)
    ema.update()
    torch.manual_seed(seed + 1 + rank)
    center, outputs = torch.zeros(1, 4), torch.randn(3, 4)
    sf.ops.update_center_(center, outputs, 0.9)
    return [p.detach() for p in ema.teacher.parameters()], [p.detach() for p in student.module.parameters()], \
        outputs, center


@pytest.mark.slow
def test_ema_ddp_student_and_distributed_center(seed):
    ranks = run_ranks(2, _ddp_rank, seed)
    torch.manual_seed(seed)
    init = [p.detach() for p in _Net().parameters()]
    for teacher, student, _, _ in ranks:
        for t, s, p0 in zip(teacher, student, init):
            assert torch.equal(t, p0.lerp(s, 0.1))
    mean = torch.cat([r[2] for r in ranks]).mean(0, keepdim=True)
    for r in ranks:
        assert_close(r[3], 0.1 * mean, 1e-6, "distributed DINO center")


def test_ema_module_unwraps_data_parallel():
    student = _Net()
    ema = sf.EMA(nn.DataParallel(student))
    assert ema.student is student


# ------------------------------------------------------------------------------------------ fused AdamW + EMA
def _mlp():
    """Conv (4-D weight + bias), BatchNorm (1-D weight + bias), two Linears: 7 parameter tensors."""
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4 * 4, 9),
                         nn.Linear(9, 5, bias=False))


def _grads(params, k):
    g = torch.Generator().manual_seed(1000 + k)
    return [torch.randn(p.shape, generator=g) for p in params]


def _steps_side_by_side(pairs, ref_ema, x, steps=4):
    """`steps` training steps of each (model, optimizer) pair on x; the reference EMA follows the second."""
    for _ in range(steps):
        for model, o in pairs:
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
        ref_ema.update()


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_adamw_ema_equals_torch_adamw_plus_lerp(seed, t_dtype):
    ref_model = _mlp()
    model = _mlp()
    model.load_state_dict(ref_model.state_dict())
    ref_teacher = [p.detach().clone().to(t_dtype) for p in ref_model.parameters()]
    teacher = [t.clone() for t in ref_teacher]
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    groups = lambda ps: [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0, "lr": 3e-3}]  # noqa: E731
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = AdamWEMA(groups(params), teacher=teacher, ema_momentum=0.9, **kw)
    ref = torch.optim.AdamW(groups(ref_params), **kw)
    for k in range(5):
        for p, rp, g in zip(params, ref_params, _grads(params, k)):
            p.grad, rp.grad = g.clone(), g.clone()
        if k == 2:  # a parameter without gradient is not stepped, but its teacher still follows it
            params[1].grad = ref_params[1].grad = None
        opt.step()
        ref.step()
        R.ema_update_(ref_teacher, [p.detach() for p in ref_params], 0.9)
    for p, rp in zip(params, ref_params):
        assert_close(p, rp, 1e-6, f"param (seed {seed})")
    for t, rt in zip(teacher, ref_teacher):
        assert_close(t, rt, 1e-6 if t_dtype == torch.float32 else 1e-2, f"teacher (seed {seed})")
    s, rs = opt.state[params[0]], ref.state[ref_params[0]]
    assert float(s["step"]) == float(rs["step"]) == 5
    assert_close(s["exp_avg_sq"], rs["exp_avg_sq"], 1e-6, "exp_avg_sq")


def test_adamw_ema_with_ema_module_and_state_dict(seed):
    student = _Net()
    ref_student = _Net()
    ref_student.load_state_dict(student.state_dict())
    ema = sf.EMA(student, momentum=0.9, total_steps=3)
    ref_ema = sf.EMA(ref_student, momentum=0.9, total_steps=3)
    opt = AdamWEMA(student.parameters(), teacher=ema, lr=1e-2)
    ref = torch.optim.AdamW(ref_student.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 6, 6)
    _steps_side_by_side(((student, opt), (ref_student, ref)), ref_ema, x)
    assert ema.step == ref_ema.step == 4
    for a, b in zip(ema.teacher.state_dict().values(), ref_ema.teacher.state_dict().values()):
        assert_close(a.float(), b.float(), 1e-6, "teacher state")
    # torch AdamW's state dict loads into AdamWEMA (CPU step tensors are fine)
    opt2 = AdamWEMA(_Net().parameters(), lr=1e-2)
    opt2.load_state_dict(ref.state_dict())
    assert float(next(iter(opt2.state.values()))["step"]) == 4


def test_torch_fused_fallback_is_torch_adamw(seed):
    """The CUDA-without-_C path (torch._fused_adamw_ + foreach lerp), run here on CPU tensors."""
    params = [torch.randn(s) for s in [(7, 3), (5,), (2, 3, 4)]]
    grads = [torch.randn_like(p) for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    for r, g in zip(ref, grads):
        r.grad = g
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    teachers = [torch.randn_like(p) for p in params]
    ref_t = [t.clone() for t in teachers]
    ops._torch_fused_adamw_ema(params, grads, m, v, steps, teachers, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                               weight_decay=0.1, momentum=0.7)
    torch.optim.AdamW(ref, lr=0.1, betas=(0.9, 0.99), weight_decay=0.1).step()
    for p, r, t, rt in zip(params, ref, teachers, ref_t):
        assert_close(p, r, 1e-6, "param")
        assert_close(t, rt.lerp(p, 0.3), 1e-6, "teacher")
    assert float(steps[0]) == 1


def test_fused_plan_fallback_rows():
    params = [torch.randn(6, 4), torch.randn(4, 12)[:, ::3], torch.randn(3)]  # the second is not dense
    teachers = [torch.randn(4, 6).t(), torch.randn(4, 4), torch.randn(3)]     # the first has another layout
    plan = ops.LARSEMAPlan(params, [torch.zeros_like(p) for p in params], teachers, [True] * 3, [True] * 3)
    assert plan.slow == [1] and plan.teacher_fallback == [0] and plan.fast == [0, 2]
    (tbl,) = plan.tables
    assert [bool(f & ops.FLAG_TEACHER) for f in tbl.field("flags")[:2]] == [False, True]


def test_fused_plan_puts_gradients_in_the_param_layout():
    p = torch.randn(4, 3, 5, 2).to(memory_format=torch.channels_last)
    plan = ops.AdamWEMAPlan([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros(())], None)
    g = torch.randn(4, 3, 5, 2)  # contiguous, as a hand-assigned gradient may be
    (out,) = plan._grads([p], [g])
    assert out.stride() == p.stride() and torch.equal(out, g)
    g_cl = g.to(memory_format=torch.channels_last)
    assert plan._grads([p], [g_cl])[0] is g_cl


def test_adamw_ema_functional_and_bad_input(seed):
    params = [torch.randn(s) for s in [(7, 3), (5,)]]
    grads = [torch.randn_like(p) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    teachers = [torch.randn_like(params[0]), None]
    ref_p = [p.clone() for p in params]
    ref_t = teachers[0].clone()
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(p) for p in ref_p], lr=0.1)
    for rp, g in zip(ref_opt.param_groups[0]["params"], grads):
        rp.grad = g
    ref_opt.step()
    sf.ops.adamw_ema_step_(params, grads, m, v, steps, teachers, lr=0.1, momentum=0.5)
    for p, rp in zip(params, ref_opt.param_groups[0]["params"]):
        assert_close(p, rp, 1e-6, "param")
    assert_close(teachers[0], ref_t.lerp(params[0], 0.5), 1e-6, "teacher")
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        sf.ops.adamw_ema_step_(params, [grads[0], torch.randn(6)], m, v, steps, lr=0.1)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\]"):
        sf.ops.adamw_ema_step_(params, grads, [m[0].double(), m[1]], v, steps, lr=0.1)
    with pytest.raises(TypeError, match=r"steps\[1\]"):
        sf.ops.adamw_ema_step_(params, grads, m, v, [steps[0], torch.zeros((), dtype=torch.long)], lr=0.1)
    with pytest.raises(ValueError, match=r"teachers\[0\]"):
        sf.ops.adamw_ema_step_(params, grads, m, v, steps, [torch.randn(3), None], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        sf.ops.adamw_ema_step_(params, grads, m, v, steps, lr=-1.0)
    with pytest.raises(ValueError, match="params and teacher"):
        AdamWEMA(params, teacher=[teachers[0]])


# ------------------------------------------------------------------------------------------ fused LARS + EMA
def _lars_side_by_side(opt, params, ref_params, ref_teacher, grads, kw, steps=5):
    """`steps` LARSEMA steps (EMA momentum 0.8) against the literal LARS (`kw`, decay and adaptation on the
    matrices only) + lerp of ref_teacher, both fed grads(k); returns the reference momentum buffers."""
    mus = [torch.zeros_like(p) for p in ref_params]
    keep = [p.ndim > 1 for p in ref_params]
    for k in range(steps):
        gs = grads(k)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        R.lars_step_literal_(ref_params, gs, mus, decay=keep, adapt=keep, **kw)
        torch._foreach_lerp_(ref_teacher, [p.detach() for p in ref_params], 0.2)
    return mus


@pytest.mark.parametrize("use_ema_module", [False, True])
def test_lars_ema_equals_barlow_lars_plus_lerp(seed, use_ema_module):
    student = _mlp()
    ref_student = _mlp()
    ref_student.load_state_dict(student.state_dict())
    params, ref_params = list(student.parameters()), list(ref_student.parameters())
    kw = dict(lr=0.3, momentum=0.9, weight_decay=1e-2, eta=2e-2)
    if use_ema_module:
        ema = sf.EMA(student, momentum=0.8)
        teacher = list(ema.teacher.parameters())
        opt = LARSEMA(params, teacher=ema, **kw)
    else:
        teacher = [p.detach().clone() for p in params]
        opt = LARSEMA(params, teacher=teacher, ema_momentum=0.8, **kw)
    ref_teacher = [p.detach().clone() for p in ref_params]
    keep = [p.ndim > 1 for p in ref_params]  # biases and BatchNorm weights excluded from decay and adaptation
    assert keep.count(False) == 4
    mus = _lars_side_by_side(opt, params, ref_params, ref_teacher, lambda k: _grads(params, k), kw)
    for p, rp in zip(params, ref_params):
        assert_close(p, rp, 1e-6, f"param (seed {seed})")
    for t, rt in zip(teacher, ref_teacher):
        assert_close(t, rt, 1e-6, f"teacher (seed {seed})")
    for p, mu in zip(params, mus):
        assert_close(opt.state[p]["momentum_buffer"], mu, 1e-6, "momentum buffer")


def test_lars_trust_ratio_edge_cases():
    """Zero parameter norm or zero update norm → trust ratio 1, as in the official code."""
    params = [torch.zeros(4, 3), torch.randn(4, 3), torch.randn(6)]
    grads = [torch.randn(4, 3), torch.zeros(4, 3), torch.randn(6)]
    ref = [p.clone() for p in params]
    mus, ref_mus = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    sf.ops.lars_ema_step_(params, grads, mus, lr=0.5, weight_decay=0.0, eta=1e-3)
    keep = [True, True, False]
    R.lars_step_literal_(ref, grads, ref_mus, lr=0.5, momentum=0.9, weight_decay=0.0, eta=1e-3, decay=keep,
                         adapt=keep)
    for p, rp in zip(params, ref):
        assert torch.allclose(p, rp, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\]"):
        sf.ops.lars_ema_step_(params, grads, [torch.zeros(3)] + mus[1:], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        sf.ops.lars_ema_step_(params, grads, mus, lr=0.1, momentum=2.0)


# ------------------------------------------------------------------------------------------ DINO center
def test_update_center_is_dino(seed):
    center = torch.randn(1, 11)
    out = torch.randn(9, 11)
    want = center * 0.9 + (torch.sum(out, dim=0, keepdim=True) / len(out)) * (1 - 0.9)
    sf.ops.update_center_(center, out, 0.9)
    assert torch.allclose(center, want, rtol=1e-6, atol=1e-7)
    flat = torch.randn(11)
    sf.ops.update_center_(flat, out.to(torch.bfloat16), 0.5)
    with pytest.raises(ValueError, match="center"):
        sf.ops.update_center_(torch.zeros(1, 10), out)
    with pytest.raises(ValueError, match="teacher_output"):
        sf.ops.update_center_(center, torch.randn(11))
    with pytest.raises(ValueError, match="momentum"):
        sf.ops.update_center_(center, out, 1.5)


# ------------------------------------------------------------------------------------------ bench cases
def test_bench_cases_run_on_cpu():
    assert len(bench_ema.vit_b16_shapes()) == 150 and bench_ema._numel(bench_ema.vit_b16_shapes()) == 85_798_656
    assert len(bench_ema.resnet50_shapes()) == 161 and bench_ema._numel(bench_ema.resnet50_shapes()) == 25_557_032
    dev = torch.device("cpu")
    for factory in bench_ema.SMALL_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            st = factory(dev, dtype)
            st.fused()
            st.reference()
            for fn in st.others.values():
                fn()
            assert st.bytes > 0


# ------------------------------------------------------------------------------------------ GPU
GPU_SHAPES = bench_ema.vit_b16_shapes()[:30] + [(1,), (7,), (8,), (9,), (8191,), (8193,), (3, 8192 + 5), (0, 5),
                                                (64, 32, 3, 3)]


def _gpu_lists(t_dtype, s_dtype):
    teacher, student = _lists(GPU_SHAPES, t_dtype, s_dtype, device="cuda")
    # a misaligned view (scalar path) and channels_last pairs (dense, non-contiguous)
    base_t, base_s = torch.randn(10_001, device="cuda").to(t_dtype), torch.randn(10_001, device="cuda").to(s_dtype)
    teacher.append(base_t[1:])
    student.append(base_s[1:])
    cl = torch.randn(6, 5, 4, 3, device="cuda")
    teacher.append(cl.to(t_dtype, memory_format=torch.channels_last))
    student.append(torch.randn_like(cl).to(s_dtype, memory_format=torch.channels_last))
    teacher.append(torch.randn(4, 6, device="cuda").to(t_dtype).t())  # layouts differ: reference fallback
    student.append(torch.randn(6, 4, device="cuda").to(s_dtype))
    return teacher, student


@pytest.mark.gpu
@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_gpu_ema_equals_lerp(seed, t_dtype, s_dtype):
    assert _backend.csrc_available(), "sslfast._C must be built wherever CUDA is available (nvcc is needed)"
    teacher, student = _gpu_lists(t_dtype, s_dtype)
    want = _lerp_oracle(teacher, student, M)
    sf.ema_update_(teacher, student, M)
    torch.cuda.synchronize()
    for i, (t, w) in enumerate(zip(teacher, want)):
        if t_dtype == torch.float32:
            assert torch.equal(t, w), f"tensor {i} {tuple(t.shape)} (seed {seed})"
        else:
            _ulp_close(t, w, f"tensor {i} {tuple(t.shape)} (seed {seed})")
    if t_dtype == s_dtype:  # torch's own lerp on the GPU: bit for bit in fp32
        teacher, student = _gpu_lists(t_dtype, s_dtype)
        ref = [t.clone() for t in teacher]
        torch._foreach_lerp_(ref, student, 1 - M)
        sf.ema_update_(teacher, student, M)
        for i, (t, r) in enumerate(zip(teacher, ref)):
            if t_dtype == torch.float32:
                assert torch.equal(t, r), f"tensor {i} vs torch._foreach_lerp_"
            else:
                _ulp_close(t, r, f"tensor {i} vs torch._foreach_lerp_")


@pytest.mark.gpu
def test_gpu_ema_many_tensors_take_several_launches(seed):
    shapes = [(i % 97 + 1, 3) for i in range(1000)]
    teacher, student = _lists(shapes, device="cuda")
    want = _lerp_oracle(teacher, student, 0.7)
    sf.ema_update_(teacher, student, 0.7)
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    assert len(ops._EMA_PLANS.plans[key].tables) == 3
    for t, w in zip(teacher, want):
        assert torch.equal(t, w)


@pytest.mark.gpu
def test_gpu_ema_fallback_without_csrc(seed, monkeypatch):
    teacher, student = _gpu_lists(torch.float32, torch.bfloat16)
    want = _lerp_oracle(teacher, student, M)
    monkeypatch.setattr(ops, "use_csrc", lambda *t: False)
    sf.ema_update_(teacher, student, M)
    for t, w in zip(teacher, want):
        assert torch.equal(t, w)


@pytest.mark.gpu
def test_gpu_ema_device_momentum_and_cuda_graph(seed):
    teacher, student = _lists(bench_ema.vit_b16_shapes()[:20] + [(13,)], device="cuda")
    start = [t.clone() for t in teacher]
    m = torch.full((), 0.9, device="cuda")
    graph = capture(lambda: sf.ema_update_(teacher, student, m), torch.device("cuda"))
    assert graph is not None
    for momentum in (0.9, 0.6, 0.99):
        for t, t0 in zip(teacher, start):
            t.copy_(t0)
        m.fill_(momentum)  # the replay reads the current value: no re-capture, no host sync
        graph.replay()
        torch.cuda.synchronize()
        w = 1 - torch.tensor(momentum, dtype=torch.float32).item()
        for t, t0, st in zip(teacher, start, student):
            assert torch.equal(t, t0.lerp(st, w)), f"momentum {momentum}"


def _cuda_models(dtype):
    """Two identical parameter lists on the GPU: conv / BatchNorm / linear layers, a 999x1000 weight (many
    chunks, an odd tail), an odd-sized bias and an empty parameter."""
    torch.manual_seed(0)
    model, ref = _mlp().cuda().to(dtype), _mlp().cuda().to(dtype)
    ref.load_state_dict(model.state_dict())
    big, ref_big = nn.Linear(1000, 999).cuda().to(dtype), nn.Linear(1000, 999).cuda().to(dtype)
    ref_big.load_state_dict(big.state_dict())
    empty = [nn.Parameter(torch.empty(0, 4, device="cuda", dtype=dtype)) for _ in range(2)]
    return (list(model.parameters()) + list(big.parameters()) + empty[:1],
            list(ref.parameters()) + list(ref_big.parameters()) + empty[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("csrc", [True, False])
def test_gpu_adamw_ema_equals_torch(seed, dtype, csrc, monkeypatch):
    if not csrc:  # CUDA without sslfast._C: torch._fused_adamw_ + foreach lerp
        monkeypatch.setattr(ops, "use_csrc", lambda *t: False)
    params, ref_params = _cuda_models(dtype)
    teacher = [p.detach().float().clone() for p in params]
    teacher[7] = teacher[7].t().contiguous().t()  # another layout than its param: EMA'd after the kernel
    ref_teacher = [t.clone() for t in teacher]
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = AdamWEMA(params, teacher=teacher, ema_momentum=0.9, **kw)
    ref = torch.optim.AdamW(ref_params, fused=True, **kw)
    for k in range(5):
        for p, rp in zip(params, ref_params):
            g = torch.randn_like(p)
            p.grad, rp.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        R.ema_update_(ref_teacher, [p.detach() for p in ref_params], 0.9)
    bound = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: a flipped rounding of a stored moment compounds
    for p, rp in zip(params, ref_params):
        if p.numel():
            assert_close(p, rp, bound, f"param {dtype}")
    for t, rt in zip(teacher, ref_teacher):
        if t.numel():
            assert_close(t, rt, bound, f"teacher {dtype}")
    if csrc:
        (plan, _, _), = opt._plans.values()
        assert plan.teacher_fallback == [7] and plan.slow == []


@pytest.mark.gpu
def test_gpu_adamw_with_ema_module(seed):
    """EMA object on the GPU: schedule, buffers copied, a frozen parameter's teacher still EMA'd."""
    student, ref_student = _Net().cuda(), _Net().cuda()
    ref_student.load_state_dict(student.state_dict())
    student.conv.bias.requires_grad_(False)
    ref_student.conv.bias.requires_grad_(False)
    with torch.no_grad():
        student.conv.bias.add_(1.0)  # the teacher has to follow it although it never gets a gradient
        ref_student.conv.bias.add_(1.0)
    ema = sf.EMA(student, momentum=0.9, total_steps=3)
    ref_ema = sf.EMA(ref_student, momentum=0.9, total_steps=3)
    with torch.no_grad():
        for m in (ema, ref_ema):
            m.teacher.conv.bias.zero_()
    opt = AdamWEMA([p for p in student.parameters() if p.requires_grad], teacher=ema, lr=1e-2)
    ref = torch.optim.AdamW([p for p in ref_student.parameters() if p.requires_grad], lr=1e-2, fused=True)
    x = torch.randn(2, 3, 6, 6, device="cuda")
    _steps_side_by_side(((student, opt), (ref_student, ref)), ref_ema, x)
    assert ema.step == ref_ema.step == 4
    for (name, a), b in zip(ema.teacher.state_dict().items(), ref_ema.teacher.state_dict().values()):
        assert_close(a.float(), b.float(), 1e-6, f"teacher {name}")


@pytest.mark.gpu
def test_gpu_adamw_ema_step_captured_in_cuda_graph(seed):
    params, ref_params = _cuda_models(torch.float32)
    teacher = [p.detach().clone() for p in params]
    ref_teacher = [t.clone() for t in teacher]
    grads = [torch.randn_like(p) for p in params]
    for p, rp, g in zip(params, ref_params, grads):
        p.grad, rp.grad = g, g.clone()
    m = torch.full((), 0.9, device="cuda")
    opt = AdamWEMA(params, teacher=teacher, ema_momentum=m, lr=1e-3)
    ref = torch.optim.AdamW(ref_params, lr=1e-3, fused=True)
    graph = capture(opt.step, torch.device("cuda"), warmup=1)
    assert graph is not None
    ref.step()
    R.ema_update_(ref_teacher, [p.detach() for p in ref_params], 0.9)
    for _ in range(3):
        graph.replay()
        ref.step()
        R.ema_update_(ref_teacher, [p.detach() for p in ref_params], 0.9)
    torch.cuda.synchronize()
    assert float(opt.state[params[0]]["step"]) == 4
    for p, rp in zip(params, ref_params):
        assert_close(p, rp, 1e-6, "param after graph replays")
    for t, rt in zip(teacher, ref_teacher):
        assert_close(t, rt, 1e-6, "teacher after graph replays")


@pytest.mark.gpu
@pytest.mark.parametrize("csrc", [True, False])
def test_gpu_lars_ema_equals_reference(seed, csrc, monkeypatch):
    if not csrc:
        monkeypatch.setattr(ops, "use_csrc", lambda *t: False)
    params, ref_params = _cuda_models(torch.float32)
    params[0].data = params[0].data.to(memory_format=torch.channels_last)  # dense, not contiguous
    ref_params[0].data = ref_params[0].data.to(memory_format=torch.channels_last)
    teacher = [p.detach().clone() for p in params]
    ref_teacher = [t.clone() for t in teacher]
    kw = dict(lr=0.3, momentum=0.9, weight_decay=1e-2, eta=2e-2)
    opt = LARSEMA(params, teacher=teacher, ema_momentum=0.8, **kw)
    _lars_side_by_side(opt, params, ref_params, ref_teacher, lambda k: [torch.randn_like(p) for p in params], kw)
    for p, rp in zip(params, ref_params):
        if p.numel():
            assert_close(p, rp, 1e-5, "param")
    for t, rt in zip(teacher, ref_teacher):
        if t.numel():
            assert_close(t, rt, 1e-5, "teacher")
