"""Teacher EMA (`sf.ema_update_`, `sf.EMA`) and its momentum schedule.

CPU: the PyTorch path equals torch's lerp (bit for bit in fp32) and the float64 formula; schedules, module
behaviour, bad input. GPU (`-m gpu`): the csrc kernels against the same oracles, the fallback without `_C`, and
CUDA-graph capture with a device-scalar momentum. The fused optimizer steps: tests/test_ema_optim.py; the
pointer tables and plans: tests/test_ema_plan.py.
"""

import math

import pytest
import torch
from torch import nn

import sslfast as sf
from sslfast import _backend
from sslfast.bench import capture
from sslfast.bench import ema as bench_ema
from sslfast.ops import ema as ops
from sslfast.schedules import cosine_momentum

from distributed_harness import run_ranks
from ema_testing import M, SHAPES, Net, lerp_oracle, lists, ulp_close
from helpers import assert_close


# ------------------------------------------------------------------------------------------ EMA numerics
@pytest.mark.parametrize("momentum", [M, 0.3, 1.0, 0.0])
def test_ema_equals_lerp_exactly_fp32(seed, momentum):
    teacher, student = lists(SHAPES)
    want = [t.lerp(s, 1 - momentum) for t, s in zip(teacher, student)]
    sf.ema_update_(teacher, student, momentum)
    for i, (t, w) in enumerate(zip(teacher, want)):
        assert torch.equal(t, w), f"tensor {i} (seed {seed})"
    # and the EMA formula itself in float64
    t64, s64 = lists(SHAPES, torch.float64, torch.float64)
    want64 = [momentum * t + (1 - momentum) * s for t, s in zip(t64, s64)]
    t32 = [t.float() for t in t64]
    sf.ema_update_(t32, [s.float() for s in s64], momentum)
    for t, w in zip(t32, want64):
        if t.numel():
            assert_close(t, w, 1e-6, "fp32 EMA vs float64 formula")


@pytest.mark.parametrize(
    "t_dtype,s_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
def test_ema_low_precision_within_rounding(seed, t_dtype, s_dtype):
    teacher, student = lists(SHAPES, t_dtype, s_dtype)
    want = lerp_oracle(teacher, student, M)
    sf.ema_update_(teacher, student, M)
    for i, (t, w) in enumerate(zip(teacher, want)):
        assert t.dtype == t_dtype
        ulp_close(t, w, f"tensor {i} {t_dtype}<-{s_dtype} (seed {seed})")


def test_ema_momentum_as_tensor_and_iterables(seed):
    teacher, student = lists(SHAPES)
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


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda t, s: sf.ema_update_(t[:2], s, M), ValueError, "teacher_tensors and student_tensors"),
        (lambda t, s: sf.ema_update_(t, s[:1] + [torch.randn(5)] + s[2:], M), ValueError, r"student_tensors\[1\]"),
        (
            lambda t, s: sf.ema_update_([torch.zeros(37, 3, 3, 3, dtype=torch.long)] + t[1:], s, M),
            TypeError,
            r"teacher_tensors\[0\]",
        ),
        (lambda t, s: sf.ema_update_(t, s[:2] + [s[2].to("meta")] + s[3:], M), ValueError, "one device"),
        (lambda t, s: sf.ema_update_(t, s, 1.5), ValueError, "momentum"),
        (lambda t, s: sf.ema_update_(t, s, "0.9"), TypeError, "momentum"),
        (lambda t, s: sf.ema_update_(t, s, torch.tensor([0.9, 0.9])), TypeError, "momentum"),
        (lambda t, s: sf.ema_update_(t[0], s[0], M), TypeError, "teacher_tensors"),
        (lambda t, s: sf.ema_update_(t, 3, M), TypeError, "student_tensors"),
    ],
)
def test_ema_bad_input(call, exc, match):
    teacher, student = lists(SHAPES)
    before = [t.clone() for t in teacher]
    with pytest.raises(exc, match=match):
        call(teacher, student)
    assert all(torch.equal(a, b) for a, b in zip(teacher, before)), "nothing may be updated on bad input"


# ------------------------------------------------------------------------------------------ schedules
def test_cosine_momentum_is_byol_and_dino():
    base, K = 0.99, 1000
    for k in (0, 1, 250, 500, 999):
        byol = 1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2  # BYOL §3.2
        assert cosine_momentum(k, K, base, 1.0) == pytest.approx(byol, abs=1e-15)
        dino = 0.9 + 0.5 * (base - 0.9) * (1 + math.cos(math.pi * k / K))  # DINO cosine_scheduler, final 0.9
        assert cosine_momentum(k, K, base, 0.9) == pytest.approx(dino, abs=1e-15)
    assert cosine_momentum(K, K, base) == 1.0 and cosine_momentum(5 * K, K, base) == 1.0
    assert cosine_momentum(123, None, base) == base
    steps = torch.tensor([0.0, 250.0, 1000.0, 2000.0])
    got = cosine_momentum(steps, K, base)
    assert torch.allclose(
        got.double(), torch.tensor([cosine_momentum(int(k), K, base) for k in steps], dtype=torch.float64), atol=1e-7
    )


def test_ema_module_schedule_params_and_buffers(seed):
    student = Net()
    ema = sf.EMA(student, momentum=0.9, final_momentum=1.0, total_steps=4)
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    expected = [p.detach().clone() for p in student.parameters()]
    for k in range(6):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student(torch.randn(2, 3, 6, 6))  # train mode: BatchNorm running statistics move
        m = cosine_momentum(k, 4, 0.9, 1.0)
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
    student = Net()
    ema = sf.EMA(student, momentum=0.99, total_steps=100)
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
        ema.update()
    state = ema.state_dict()
    assert any(k.startswith("teacher.") for k in state)
    other = sf.EMA(Net(), momentum=0.5)
    other.load_state_dict(state)
    assert other.step == 3 and other.base_momentum == 0.99 and other.total_steps == 100
    assert other.momentum == ema.momentum
    for a, b in zip(other.teacher.state_dict().values(), ema.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_module_passed_teacher_and_mismatch():
    student = Net()
    teacher = Net().to(torch.bfloat16)
    ema = sf.EMA(student, teacher, momentum=0.5)
    assert ema.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
    want = [
        t.float().lerp(s.detach(), 0.5).to(torch.bfloat16) for t, s in zip(teacher.parameters(), student.parameters())
    ]
    ema.update()
    for t, w in zip(teacher.parameters(), want):
        ulp_close(t.detach(), w)
    with pytest.raises(ValueError, match="teacher must have the student's parameters"):
        sf.EMA(student, nn.Linear(3, 3))
    other = Net()
    other.head = nn.Linear(5, 7)
    with pytest.raises(ValueError, match="teacher.head.weight"):
        sf.EMA(student, other)
    with pytest.raises(ValueError, match="total_steps"):
        sf.EMA(student, total_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        sf.EMA(student, momentum=1.2)


def test_ema_module_follows_replaced_parameters():
    student = Net()
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
    student = nn.parallel.DistributedDataParallel(Net())
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
    return (
        [p.detach() for p in ema.teacher.parameters()],
        [p.detach() for p in student.module.parameters()],
        outputs,
        center,
    )


@pytest.mark.slow
def test_ema_ddp_student_and_distributed_center(seed):
    ranks = run_ranks(2, _ddp_rank, seed)
    torch.manual_seed(seed)
    init = [p.detach() for p in Net().parameters()]
    for teacher, student, _, _ in ranks:
        for t, s, p0 in zip(teacher, student, init):
            assert torch.equal(t, p0.lerp(s, 0.1))
    mean = torch.cat([r[2] for r in ranks]).mean(0, keepdim=True)
    for r in ranks:
        assert_close(r[3], 0.1 * mean, 1e-6, "distributed DINO center")


def test_ema_module_unwraps_data_parallel():
    student = Net()
    ema = sf.EMA(nn.DataParallel(student))
    assert ema.student is student


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
GPU_SHAPES = bench_ema.vit_b16_shapes()[:30] + [
    (1,),
    (7,),
    (8,),
    (9,),
    (8191,),
    (8193,),
    (3, 8192 + 5),
    (0, 5),
    (64, 32, 3, 3),
]


def _gpu_lists(t_dtype, s_dtype):
    teacher, student = lists(GPU_SHAPES, t_dtype, s_dtype, device="cuda")
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
@pytest.mark.parametrize(
    "t_dtype,s_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
    ],
)
def test_gpu_ema_equals_lerp(seed, t_dtype, s_dtype):
    assert _backend.csrc_available(), "sslfast._C must be built wherever CUDA is available (nvcc is needed)"
    teacher, student = _gpu_lists(t_dtype, s_dtype)
    want = lerp_oracle(teacher, student, M)
    sf.ema_update_(teacher, student, M)
    torch.cuda.synchronize()
    for i, (t, w) in enumerate(zip(teacher, want)):
        if t_dtype == torch.float32:
            assert torch.equal(t, w), f"tensor {i} {tuple(t.shape)} (seed {seed})"
        else:
            ulp_close(t, w, f"tensor {i} {tuple(t.shape)} (seed {seed})")
    if t_dtype == s_dtype:  # torch's own lerp on the GPU: bit for bit in fp32
        teacher, student = _gpu_lists(t_dtype, s_dtype)
        ref = [t.clone() for t in teacher]
        torch._foreach_lerp_(ref, student, 1 - M)
        sf.ema_update_(teacher, student, M)
        for i, (t, r) in enumerate(zip(teacher, ref)):
            if t_dtype == torch.float32:
                assert torch.equal(t, r), f"tensor {i} vs torch._foreach_lerp_"
            else:
                ulp_close(t, r, f"tensor {i} vs torch._foreach_lerp_")


@pytest.mark.gpu
def test_gpu_ema_many_tensors_take_several_launches(seed):
    shapes = [(i % 97 + 1, 3) for i in range(1000)]
    teacher, student = lists(shapes, device="cuda")
    want = lerp_oracle(teacher, student, 0.7)
    sf.ema_update_(teacher, student, 0.7)
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    assert len(ops._EMA_PLANS.plans[key].tables) == 3
    for t, w in zip(teacher, want):
        assert torch.equal(t, w)


@pytest.mark.gpu
def test_gpu_ema_fallback_without_csrc(seed, monkeypatch):
    teacher, student = _gpu_lists(torch.float32, torch.bfloat16)
    want = lerp_oracle(teacher, student, M)
    monkeypatch.setattr(_backend, "csrc_available", lambda: False)  # CUDA without sslfast._C
    sf.ema_update_(teacher, student, M)
    for t, w in zip(teacher, want):
        assert torch.equal(t, w)


@pytest.mark.gpu
def test_gpu_ema_device_momentum_and_cuda_graph(seed):
    teacher, student = lists(bench_ema.vit_b16_shapes()[:20] + [(13,)], device="cuda")
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
