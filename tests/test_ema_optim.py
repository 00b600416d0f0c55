"""The optimizer steps fused with the teacher EMA (`sf.ops.adamw_ema_step_`, `sf.ops.lars_ema_step_`, and
`sslfast.optim.AdamWEMA` / `LARSEMA` around them).

CPU: the PyTorch path equals torch.optim.AdamW + lerp and the official Barlow Twins LARS + lerp over several
steps, the plans' rows, bad input. GPU (`-m gpu`): the csrc kernels and the fallback without `_C` against the
same oracles, and a step captured in a CUDA graph with a device-scalar momentum.
"""

import pytest
import torch
from torch import nn

import sslfast as sf
from sslfast import _backend
from sslfast.bench import capture
from sslfast.ops._ema_plan import FLAG_TEACHER
from sslfast.ops._torch import ema as T
from sslfast.ops.fused_optim import AdamWEMAPlan, LARSEMAPlan
from sslfast.optim import AdamWEMA, LARSEMA
from sslfast.reference import ema as R

from ema_testing import Net, mlp
from helpers import assert_close


# ------------------------------------------------------------------------------------------ fused AdamW + EMA
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
    ref_model = mlp()
    model = mlp()
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
        T.lerp_(ref_teacher, [p.detach() for p in ref_params], 0.9)
    for p, rp in zip(params, ref_params):
        assert_close(p, rp, 1e-6, f"param (seed {seed})")
    for t, rt in zip(teacher, ref_teacher):
        assert_close(t, rt, 1e-6 if t_dtype == torch.float32 else 1e-2, f"teacher (seed {seed})")
    s, rs = opt.state[params[0]], ref.state[ref_params[0]]
    assert float(s["step"]) == float(rs["step"]) == 5
    assert_close(s["exp_avg_sq"], rs["exp_avg_sq"], 1e-6, "exp_avg_sq")


def test_adamw_ema_with_ema_module_and_state_dict(seed):
    student = Net()
    ref_student = Net()
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
    opt2 = AdamWEMA(Net().parameters(), lr=1e-2)
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
    T.adamw_fused_step_(
        params, grads, m, v, steps, teachers, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, momentum=0.7
    )
    torch.optim.AdamW(ref, lr=0.1, betas=(0.9, 0.99), weight_decay=0.1).step()
    for p, r, t, rt in zip(params, ref, teachers, ref_t):
        assert_close(p, r, 1e-6, "param")
        assert_close(t, rt.lerp(p, 0.3), 1e-6, "teacher")
    assert float(steps[0]) == 1


def test_fused_plan_fallback_rows():
    params = [torch.randn(6, 4), torch.randn(4, 12)[:, ::3], torch.randn(3)]  # the second is not dense
    teachers = [torch.randn(4, 6).t(), torch.randn(4, 4), torch.randn(3)]  # the first has another layout
    plan = LARSEMAPlan(params, [torch.zeros_like(p) for p in params], teachers, [True] * 3, [True] * 3)
    assert plan.slow == [1] and plan.teacher_fallback == [0] and plan.fast == [0, 2]
    (tbl,) = plan.tables
    assert [bool(f & FLAG_TEACHER) for f in tbl.field("flags")[:2]] == [False, True]


def test_fused_plan_puts_gradients_in_the_param_layout():
    p = torch.randn(4, 3, 5, 2).to(memory_format=torch.channels_last)
    plan = AdamWEMAPlan([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros(())], None)
    g = torch.randn(4, 3, 5, 2)  # contiguous, as a hand-assigned gradient may be
    (out,) = plan.param_layout_grads([p], [g])
    assert out.stride() == p.stride() and torch.equal(out, g)
    g_cl = g.to(memory_format=torch.channels_last)
    assert plan.param_layout_grads([p], [g_cl])[0] is g_cl


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
    student = mlp()
    ref_student = mlp()
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
    R.lars_step_literal_(ref, grads, ref_mus, lr=0.5, momentum=0.9, weight_decay=0.0, eta=1e-3, decay=keep, adapt=keep)
    for p, rp in zip(params, ref):
        assert torch.allclose(p, rp, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\]"):
        sf.ops.lars_ema_step_(params, grads, [torch.zeros(3)] + mus[1:], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        sf.ops.lars_ema_step_(params, grads, mus, lr=0.1, momentum=2.0)


def _cuda_models(dtype):
    """Two identical parameter lists on the GPU: conv / BatchNorm / linear layers, a 999x1000 weight (many
    chunks, an odd tail), an odd-sized bias and an empty parameter."""
    torch.manual_seed(0)
    model, ref = mlp().cuda().to(dtype), mlp().cuda().to(dtype)
    ref.load_state_dict(model.state_dict())
    big, ref_big = nn.Linear(1000, 999).cuda().to(dtype), nn.Linear(1000, 999).cuda().to(dtype)
    ref_big.load_state_dict(big.state_dict())
    empty = [nn.Parameter(torch.empty(0, 4, device="cuda", dtype=dtype)) for _ in range(2)]
    return (
        list(model.parameters()) + list(big.parameters()) + empty[:1],
        list(ref.parameters()) + list(ref_big.parameters()) + empty[1:],
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("csrc", [True, False])
def test_gpu_adamw_ema_equals_torch(seed, dtype, csrc, monkeypatch):
    if not csrc:  # CUDA without sslfast._C: torch._fused_adamw_ + foreach lerp
        monkeypatch.setattr(_backend, "csrc_available", lambda: False)
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
        T.lerp_(ref_teacher, [p.detach() for p in ref_params], 0.9)
    bound = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: a flipped rounding of a stored moment compounds
    for p, rp in zip(params, ref_params):
        if p.numel():
            assert_close(p, rp, bound, f"param {dtype}")
    for t, rt in zip(teacher, ref_teacher):
        if t.numel():
            assert_close(t, rt, bound, f"teacher {dtype}")
    if csrc:
        ((plan, _, _),) = opt._plans.values()
        assert plan.teacher_fallback == [7] and plan.slow == []


@pytest.mark.gpu
def test_gpu_adamw_with_ema_module(seed):
    """EMA object on the GPU: schedule, buffers copied, a frozen parameter's teacher still EMA'd."""
    student, ref_student = Net().cuda(), Net().cuda()
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
    T.lerp_(ref_teacher, [p.detach() for p in ref_params], 0.9)
    for _ in range(3):
        graph.replay()
        ref.step()
        T.lerp_(ref_teacher, [p.detach() for p in ref_params], 0.9)
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
        monkeypatch.setattr(_backend, "csrc_available", lambda: False)
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
